"""Search stage: the fastest candidate within the accuracy budget, chosen on the tune split.

Every search candidate (pruning x quantization, built as a chain of the usual stages) is scored on
the tune split with the same scorer validation uses (the task's headline metric, PyTorch fp32 as
the reference) and timed interleaved with PyTorch at validate.latency's shapes (a quick timing:
search.timing). The fastest candidate at the ranking shape whose drop is within the budget wins;
the runner then validates it on eval like any variant. search.json keeps the whole trail.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config.search import SearchConfig
from pipeline.errors import InputError
from pipeline.stages.registry import StageContext, stage

TRAIL = "search.json"


@stage(
    "search",
    config=SearchConfig,
    consumes="variants",
    produces="report",
    data_splits=("tune",),
    sections=("gates", "validate", "release"),
    machine_facts=lambda config, fingerprint: dict(fingerprint),  # the ranking is by speed here
)
def search(ctx: StageContext) -> dict[str, Any]:
    """Score every search candidate on tune, time them, pick the fastest within the budget."""
    from pipeline import manifest as mf
    from pipeline.bench import speedups, summarize, time_shapes, torch_threads
    from pipeline.bench.stats import ratio_interval
    from pipeline.config.base import shape_key
    from pipeline.onnx.io import model_file, vocab_size
    from pipeline.onnx.session import open_session

    cfg: SearchConfig = ctx.config
    task = ctx.task
    validate, release = ctx.sections["validate"], ctx.sections["release"]
    lat = validate.latency
    tune = list(ctx.data.get("tune"))
    if not ctx.variants:
        raise InputError("search: no candidate was built (search.max_seconds too small?)")
    metric = task.headline_metric(validate.metric, tune)
    shapes = [(b, s) for b in task.timing_batches(lat.batch_sizes) for s in lat.seq_lens]
    rank = cfg.rank_at or release.fastest_at or shape_key(*shapes[0])
    baseline_dir = Path(ctx.input_dir)
    scorer = task.scorer(
        baseline_dir,
        tune,
        max_length=ctx.model.max_length,
        batch_size=validate.eval_batch_size,
        trust_remote_code=ctx.model.trust_remote_code,
        generation=validate.generation,
    )
    vocab = vocab_size(baseline_dir)
    trail: dict[str, dict[str, Any]] = {}
    with torch_threads(lat.threads):
        model = task.load_model(baseline_dir, trust_remote_code=ctx.model.trust_remote_code)
        base = scorer.baseline(model).metrics[metric]
        # The gates' limit (absolute, or relative to PyTorch's tune metric) unless the search has one.
        budget = (
            cfg.max_metric_drop
            if cfg.max_metric_drop is not None
            else ctx.sections["gates"].allowed_drop(base)
        )
        runners: dict[str, Any] = {"pytorch": model}
        for name, (folder, manifests) in ctx.variants.items():
            session = open_session(model_file(Path(folder)), threads=lat.threads)
            scored = scorer.variant(session, name)
            value = scored.metrics[metric]
            drop = task.metric_drop(metric, base, value)
            trail[name] = {
                "artifact": str(folder),
                "steps": [m.get("stage") for m in manifests if m.get("stage") not in ("finetune", "export")],
                "metric": round(value, 6),
                "drop": drop,
                "within_budget": drop <= budget + 1e-12,
                "agreement": scored.agreement,
                "cost_s": round(
                    sum(m.get("duration_s") or 0.0 for m in manifests if m.get("stage") != "finetune"), 2
                ),
            }
            runners[name] = session
            ctx.log.info(
                "search: %s %s %.4f on tune (drop %.4f, budget %g)", name, metric, value, drop, budget
            )
        times, quality = time_shapes(
            runners,
            shapes,
            lambda runner, batch, seq: task.timed_calls(runner, batch, seq, vocab, lat),
            warmup=cfg.timing.warmup,
            iters=cfg.timing.iters,
            block=cfg.timing.block,
            settle=cfg.timing.settle,
            max_rounds=lat.max_rounds,
            max_other_cpu=lat.max_other_cpu,
            max_turn_spread=lat.max_turn_spread,
        )
        del model, runners
    primary = task.primary_call
    latency = {
        name: {
            shape_key(b, s): task.latency_entry(
                {call: summarize(ms, b) for call, ms in times[name][shape_key(b, s)].items()}, b, s
            )
            for b, s in shapes
        }
        for name in times
    }
    for name, entry in trail.items():
        entry["latency_p50_ms"] = {key: stats["p50_ms"] for key, stats in latency[name].items()}
        entry["speedup_vs_pytorch"] = speedups(latency["pytorch"], latency[name])
        entry["speedup_ci"] = {
            key: [ci["low"], ci["high"]]
            for key in latency[name]
            for ci in [
                ratio_interval(times["pytorch"][key][primary], times[name][key][primary], cfg.timing.block)
            ]
        }
    within = [name for name, entry in trail.items() if entry["within_budget"]]
    winner = min(within, key=lambda name: trail[name]["latency_p50_ms"][rank]) if within else None
    result = {
        "metric_name": metric,
        "pytorch_metric": round(base, 6),
        "budget": budget if budget != float("inf") else None,
        "rank_at": rank,
        "tune_examples": len(tune),
        "timing_quality": quality,
        "winner": winner,
        "reason": (
            f"fastest at {rank} of {len(within)} candidate(s) within the budget"
            if winner
            else f"no candidate within the budget ({metric} drop <= {budget:g} on tune)"
        ),
        "candidates": trail,
    }
    mf.write_json(ctx.output_dir / TRAIL, result)
    ctx.log.info("search: winner %s (%s)", winner, result["reason"])
    return {"winner": winner, "candidates": len(trail)}


def load_trail(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / TRAIL).read_text(encoding="utf-8"))
