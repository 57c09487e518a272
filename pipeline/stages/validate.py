"""Validate stage: accuracy and speed of every variant against the PyTorch baseline.

A thin adapter: evaluation comes from the task (pipeline.tasks: its scorer, metrics and timing
calls), sessions and provider placement from pipeline.onnx.session, measurement from
pipeline.bench. It writes `measurements.json`; the runner then takes the decisions (gates, release
pick) and writes the report.

1. Accuracy: the task's standard metric on the recipe's eval split, for the PyTorch fp32 checkpoint
   (the baseline) and every ONNX variant, on the same examples; agreement = share of predictions
   equal to the baseline's (NER: per word; embeddings: mean cosine; decoders: greedy tokens).
2. Providers: CPUExecutionProvider always; CUDA/TensorRT when asked for and really present. A
   session is trusted only if `session.get_providers()` puts the asked-for provider first; a silent
   fallback to CPU is a StageError unless `validate.allow_provider_fallback`. Node placement comes
   from ORT's profiler (first run only). Where a provider is absent the report says so, with no
   numbers.
3. Speed: PyTorch eager fp32 and every variant x provider, at every (batch, seq) of
   validate.latency, threads pinned, all in this process and interleaved, so their ratios
   (speed-up = p50 ratio) hold on a noisy machine. Peak RSS of load + the timed calls at the
   largest shape, per candidate in a fresh process, after the timing so it cannot disturb it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config.validate import ValidateConfig
from pipeline.errors import InputError, RecipeError, StageError
from pipeline.stages.registry import StageContext, stage

MEASUREMENTS = "measurements.json"
NOT_AVAILABLE = "not available on this machine"
# A memory probe's peak, at most, per byte of its candidate on disk (weights, a copy while loading,
# activations); two probes run at once only when free memory holds two such peaks.
MEMORY_PER_MODEL_BYTE = 3
UNSTRUCTURED_NOTE = (
    "unstructured sparsity gives no speed-up in ONNX Runtime: the zeroed weights are still stored and "
    "multiplied as dense tensors (same file size; only the gzip-compressed size drops)"
)
# Bulky stage metrics left out of the report (they stay in the stage manifests).
_BULKY_METRICS = ("history", "sparsity_per_layer", "recover_history", "training")
ADAPTERS_NOTE = (
    "LoRA adapters: this variant's metric and speed are its base model's (no adapter active); "
    "each adapter's perplexity on every label's eval texts is under `adapters`"
)


def check_metric(task: Any, cfg: ValidateConfig) -> None:
    """RecipeError when the task cannot be validated, or validate.metric is not one of its metrics."""
    if not task.scorable:
        raise RecipeError(f"validate: task {task.name!r} cannot be validated yet (no metric on real data)")
    if cfg.metric is not None and cfg.metric not in task.metrics:
        raise RecipeError(
            f"validate.metric: {cfg.metric!r} is not a {task.name} metric; "
            f"expected one of {', '.join(task.metrics)}"
        )


@stage(
    "validate",
    config=ValidateConfig,
    consumes="variants",
    produces="report",
    data_splits=("eval",),
    machine_facts=lambda config, fingerprint: dict(fingerprint),  # timings are of this machine
)
def validate(ctx: StageContext) -> dict[str, Any]:
    """Measure every variant against PyTorch: task metric on eval, interleaved speed, memory."""
    from pipeline import manifest as mf
    from pipeline.bench.interference import load_notes
    from pipeline.data import examples_digest
    from pipeline.onnx.io import model_bytes
    from pipeline.onnx.session import session_options

    cfg: ValidateConfig = ctx.config
    task = ctx.task
    check_metric(task, cfg)
    examples = list(ctx.data.get("eval"))[: cfg.max_eval_examples]
    if not examples:
        raise InputError("data.eval: no examples to validate on")
    if not ctx.variants:
        raise InputError("validate: the recipe has no variant artifacts to validate")
    ctx.log.info("validating %d variant(s) against PyTorch ...", len(ctx.variants))
    measured = _measure(ctx, examples)
    for name, entry in measured["variants"].items():
        folder, manifests = ctx.variants[name]
        entry["size_bytes"] = model_bytes(Path(folder))
        facts = stage_facts(manifests)
        entry["notes"] = entry.get("notes", []) + facts.pop("notes")
        entry.update(facts)
    loads = measured.pop("load_average_1m")
    latency = cfg.latency
    report: dict[str, Any] = {
        "format_version": 1,
        "task": task.name,
        "metric_name": measured["metric_name"],
        "metric_higher_is_better": measured["metric_name"] not in task.lower_is_better,
        "machine": dict(ctx.machine),
        "versions": mf.versions(),
        "settings": {
            "eval_examples": len(examples),
            "eval_data_sha256": examples_digest(examples),
            "eval_batch_size": cfg.eval_batch_size,
            "latency": latency.model_dump(mode="json"),
            "providers": list(cfg.providers),
            "allow_provider_fallback": cfg.allow_provider_fallback,
            "session_options": session_options(latency.threads),
            "load_average_1m": loads,
            **measured["settings"],
        },
        "providers": measured["providers"],
        "baseline": measured["baseline"],
        "variants": measured["variants"],
        "notes": measured["notes"] + load_notes(*loads.values(), ctx.machine.get("cores") or 1),
    }
    mf.write_json(ctx.output_dir / MEASUREMENTS, report)
    return {"metric_name": report["metric_name"], "variants": len(report["variants"])}


def _measure(ctx: StageContext, examples: list[Any]) -> dict[str, Any]:
    """Scores, provider results, latencies and peak memory of the baseline and every variant."""
    import onnxruntime  # noqa: F401  (loaded before anything is timed)
    import torch
    from tqdm import tqdm

    from pipeline.bench import speedups, summarize, time_shapes, torch_threads
    from pipeline.bench.interference import load_average
    from pipeline.bench.stats import ratio_interval, turn_medians
    from pipeline.model_source import random_weights
    from pipeline.onnx.io import model_file, read_config
    from pipeline.onnx.session import CPU, node_placement, open_session, provider_availability

    cfg: ValidateConfig = ctx.config
    lat = cfg.latency
    task = ctx.task
    baseline_dir = Path(ctx.input_dir)
    hf_config = read_config(baseline_dir)
    vocab_size = int(hf_config.get("vocab_size") or 0)
    if vocab_size <= 0:
        raise InputError(f"{baseline_dir}/config.json: no vocab_size (needed for the timing inputs)")
    max_positions = hf_config.get("max_position_embeddings") or hf_config.get("n_positions")
    if max_positions and max(lat.seq_lens) > max_positions:
        raise RecipeError(
            f"validate.latency.seq_lens: {max(lat.seq_lens)} exceeds the model's "
            f"max_position_embeddings {max_positions}"
        )
    random_model = random_weights(baseline_dir)
    metric_name = task.headline_metric(cfg.metric, examples)
    shapes = [(b, s) for b in task.timing_batches(lat.batch_sizes) for s in lat.seq_lens]
    biggest = (max(b for b, _ in shapes), max(lat.seq_lens))
    smallest = (min(b for b, _ in shapes), min(lat.seq_lens))
    trust = ctx.model.trust_remote_code
    scorer = task.scorer(
        baseline_dir,
        examples,
        max_length=ctx.model.max_length,
        batch_size=cfg.eval_batch_size,
        trust_remote_code=trust,
        generation=cfg.generation,
    )

    runners: dict[str, Any] = {}  # timing label -> torch model or ONNX session
    labels: dict[tuple[str, str], str] = {}  # (variant, provider) -> timing label
    with torch_threads(lat.threads):
        ctx.log.info(
            "validate: PyTorch eager fp32 baseline %s on %d eval examples", baseline_dir, len(examples)
        )
        model = task.load_model(baseline_dir, trust_remote_code=trust)
        scored = scorer.baseline(model)
        if metric_name not in scored.metrics:
            raise InputError(
                f"validate.metric: {metric_name!r} not computed for this eval data "
                f"(got {', '.join(scored.metrics)})"
            )
        baseline: dict[str, Any] = {
            "name": "pytorch-eager-fp32",
            "checkpoint": str(baseline_dir),
            "metric": scored.metrics[metric_name],
            "metrics": scored.metrics,
            "classification_report": scored.report,
            "size_bytes": sum(
                p.stat().st_size for p in baseline_dir.iterdir() if p.suffix in (".safetensors", ".bin")
            ),
            "peak_rss_bytes": None,
            "torch_version": torch.__version__,
        }
        runners["pytorch"] = model
        ctx.log.info("validate: PyTorch %s = %.4f", metric_name, baseline["metric"])

        availability = {p: provider_availability(p) for p in cfg.providers}
        variants: dict[str, dict[str, Any]] = {}
        with tempfile.TemporaryDirectory(prefix="validate-profile-") as profiles:
            for name, (folder, _) in ctx.variants.items():
                path = model_file(Path(folder))
                entry: dict[str, Any] = {"artifact": str(folder), "providers": {}}
                for provider in cfg.providers:
                    usable, reason = availability[provider]
                    if not usable:
                        entry["providers"][provider] = {"status": NOT_AVAILABLE, "reason": reason}
                        continue
                    session = open_session(path, provider, lat.threads, str(Path(profiles) / "p"))
                    actual = list(session.get_providers())
                    # One profiled run of each call: where its nodes really ran. Placement is
                    # fixed when the session partitions the graph, so the smallest shape shows it
                    # (the largest cost 11 s of SmolLM2's validation for the same answer).
                    for call in task.timing_calls(session, *smallest, vocab_size).values():
                        call()
                    result: dict[str, Any] = {
                        "session_providers": actual,
                        "node_placement": node_placement(session.end_profiling()),
                    }
                    if actual[0] != provider:
                        message = (
                            f"validate: variant {name}: asked for {provider} "
                            f"but the session runs on {actual[0]} (silent fallback)"
                        )
                        if not cfg.allow_provider_fallback:
                            raise StageError(
                                message + "; set validate.allow_provider_fallback: true to accept it"
                            )
                        ctx.log.warning("%s; no numbers reported for it", message)
                        entry["providers"][provider] = {**result, "status": f"fell back to {actual[0]}"}
                        continue
                    label = (
                        name if provider == CPU else f"{name}@{provider.removesuffix('ExecutionProvider')}"
                    )
                    variant = scorer.variant(session, label)
                    result.update(
                        {
                            "status": "ok",
                            "metric": variant.metrics.get(metric_name),
                            "metrics": variant.metrics,
                            "agreement": variant.agreement,
                            "peak_rss_bytes": None,
                            **variant.extra,
                        }
                    )
                    if provider == CPU:
                        result["classification_report"] = variant.report
                    entry["providers"][provider] = result
                    runners[label] = session
                    labels[(name, provider)] = label
                    ctx.log.info(
                        "validate: %s %s = %.4f (agreement %s)",
                        label,
                        metric_name,
                        result["metric"],
                        variant.agreement,
                    )
                variants[name] = entry

        load_before = load_average()
        total = len(runners) * sum(sum(task.timed_runs(s, lat).values()) for _, s in shapes)

        def log_shape(key: str, times: dict[str, dict[str, list[float]]]) -> None:
            p50s = {
                name: "/".join(f"{summarize(ms, 1)['p50_ms']:.2f}" for ms in per_call.values())
                for name, per_call in times.items()
            }
            ctx.log.info("validate: %s p50 ms: %s", key, ", ".join(f"{n} {v}" for n, v in p50s.items()))

        def log_retry(key: str, round_index: int, reasons: list[str]) -> None:
            ctx.log.warning(
                "validate: %s timing round %d disturbed (%s); timing it again",
                key,
                round_index,
                "; ".join(reasons),
            )

        with tqdm(total=total, desc="benchmark", unit="run", disable=None, leave=False) as bar:
            times, quality = time_shapes(
                runners,
                shapes,
                lambda runner, batch, seq: task.timed_calls(runner, batch, seq, vocab_size, lat),
                warmup=lat.warmup,
                iters=lat.iters,
                block=lat.block,
                settle=lat.settle,
                runs_of=lambda seq: task.timed_runs(seq, lat),
                progress=bar,
                on_shape=log_shape,
                on_retry=log_retry,
                max_rounds=lat.max_rounds,
                max_other_cpu=lat.max_other_cpu,
                max_turn_spread=lat.max_turn_spread,
            )
        load_after = load_average()
        timings = {
            label: {
                key: task.latency_entry({call: summarize(ms, b) for call, ms in per_call.items()}, b, s)
                for (b, s), (key, per_call) in zip(shapes, by_shape.items(), strict=True)
            }
            for label, by_shape in times.items()
        }
        primary = task.primary_call
        intervals = {
            label: {
                key: ratio_interval(
                    times["pytorch"][key][primary], per_call[primary], lat.block, confidence=lat.confidence
                )
                for key, per_call in by_shape.items()
            }
            for label, by_shape in times.items()
            if label != "pytorch"
        }
        for label, by_shape in times.items():
            for key, per_call in by_shape.items():
                timings[label][key]["turn_medians_ms"] = turn_medians(per_call[primary], lat.block)
        for key, record in quality.items():
            if record["interfered"]:
                ctx.log.warning("validate: %s timing interfered with: %s", key, "; ".join(record["reasons"]))
            elif record.get("unsteady"):
                ctx.log.info(
                    "validate: %s timing unsteady after %d round(s) (in the intervals): %s",
                    key,
                    record["rounds"],
                    "; ".join(record["unsteady"]),
                )
        runners.clear()  # free the runtimes before the memory probes
        del model

    if cfg.measure_memory:
        _probe_memory(ctx, baseline, variants, labels, biggest, vocab_size)

    baseline["latency"] = timings["pytorch"]
    for (name, provider), label in labels.items():
        result = variants[name]["providers"][provider]
        result["latency"] = timings[label]
        result["speedup_vs_pytorch"] = speedups(baseline["latency"], timings[label])
        result["speedup_ci"] = {key: [ci["low"], ci["high"]] for key, ci in intervals[label].items()}
        result.update(call_speedups(baseline["latency"], timings[label]))
    for entry in variants.values():
        cpu = entry["providers"][CPU]
        entry.update(
            {
                "metric": cpu["metric"],
                "metrics": cpu["metrics"],
                "metric_drop": task.metric_drop(metric_name, baseline["metric"], cpu["metric"]),
                "agreement": cpu["agreement"],
                "classification_report": cpu.pop("classification_report", ""),
                "latency": cpu["latency"],
                "speedup_vs_pytorch": cpu["speedup_vs_pytorch"],
                "speedup_ci": cpu["speedup_ci"],
                "peak_rss_bytes": cpu.get("peak_rss_bytes"),
                **{k: v for k, v in cpu.items() if k.endswith("_speedup_vs_pytorch")},
            }
        )
    notes = list(scorer.notes)
    if random_model and not notes:
        notes.append(
            "random weights (config.json pipeline_random_weights): the metric measures the "
            "variants' fidelity to the fp32 model, not a task skill; only the speed figures transfer"
        )
    if task.timing_batches(lat.batch_sizes) != list(lat.batch_sizes):
        notes.append(
            f"{task.name} is timed at batch {', '.join(map(str, task.timing_batches(lat.batch_sizes)))} only "
            "(per-token decode latency after a past of seq tokens)"
        )
    return {
        "metric_name": metric_name,
        "baseline": baseline,
        "variants": variants,
        "providers": {
            p: ("used" if ok else f"{NOT_AVAILABLE} ({reason})") for p, (ok, reason) in availability.items()
        },
        "settings": {
            "random_weights": random_model,
            "timing_quality": quality,
            "speedup_ci_method": (
                f"paired bootstrap over the interleaved turns ({lat.iters} runs in turns of {lat.block}) of "
                f"the ratio of medians, {lat.confidence:.0%} interval"
            ),
            "memory_method": (
                "peak RSS growth while loading + the timed calls at the largest shape "
                f"(b{biggest[0]} s{biggest[1]}), each candidate in a fresh process"
                if cfg.measure_memory
                else "not measured (validate.measure_memory: false)"
            ),
            **scorer.settings,
        },
        "notes": notes,
        "load_average_1m": {"before_timing": load_before, "after_timing": load_after},
    }


def _probe_memory(
    ctx: StageContext,
    baseline: dict[str, Any],
    variants: dict[str, dict[str, Any]],
    labels: dict[tuple[str, str], str],
    biggest: tuple[int, int],
    vocab_size: int,
) -> None:
    """Peak memory of each candidate in a fresh process (in-process numbers reuse freed memory)."""
    from concurrent.futures import ThreadPoolExecutor

    import psutil
    from tqdm import tqdm

    from pipeline.bench.memprobe import measure_peak_memory
    from pipeline.onnx.io import model_bytes, model_file
    from pipeline.onnx.session import CPU

    probes = [("torch", Path(ctx.input_dir), CPU, baseline)]
    for name, provider in labels:
        probes.append(
            ("onnx", model_file(Path(ctx.variants[name][0])), provider, variants[name]["providers"][provider])
        )

    def probe(candidate: tuple[str, Path, str, dict[str, Any]]) -> int:
        kind, path, provider, _ = candidate
        try:
            return measure_peak_memory(
                kind,
                path,
                batch=biggest[0],
                seq=biggest[1],
                threads=ctx.config.latency.threads,
                vocab_size=vocab_size,
                provider=provider,
                task=ctx.task.name,
            )["delta_bytes"]
        except (RuntimeError, OSError) as err:
            raise StageError(f"validate: {err}") from None

    # The probes read the kernel's exact high-water mark (VmHWM), so two at once measure the same;
    # they run two at a time when the machine's free memory holds two of the largest candidate.
    largest = max(baseline["size_bytes"], *(model_bytes(path.parent) for _, path, _, _ in probes[1:]))
    workers = 2 if psutil.virtual_memory().available > 2 * MEMORY_PER_MODEL_BYTE * largest else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        peaks = list(
            tqdm(pool.map(probe, probes), total=len(probes), desc="peak memory", disable=None, leave=False)
        )
    for (_, _, _, target), peak in zip(probes, peaks, strict=True):
        target["peak_rss_bytes"] = peak


def call_speedups(
    reference: dict[str, dict[str, Any]], candidate: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Speed-ups of the secondary timed calls (a decoder's prefill): `<call>_speedup_vs_pytorch`."""
    ratios: dict[str, dict[str, float]] = {}
    for key, stats in candidate.items():
        for field, value in stats.items():
            if field.endswith("_ms_p50") and value and (reference.get(key) or {}).get(field):
                call = field.removesuffix("_ms_p50")
                ratios.setdefault(f"{call}_speedup_vs_pytorch", {})[key] = round(
                    reference[key][field] / value, 4
                )
    return ratios


def stage_facts(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant from its stage manifests: the stage list, attention fusion, sparsity notes."""
    stages, notes = [], []
    fusion, sparsity, adapters = None, None, None
    for manifest in manifests:
        metrics = manifest.get("metrics") or {}
        stage_name = manifest.get("stage")
        stages.append(
            {
                "stage": stage_name,
                "config": manifest.get("config"),
                "cache_key": manifest.get("cache_key"),
                "data": manifest.get("data") or {},
                "metrics": {k: v for k, v in metrics.items() if k not in _BULKY_METRICS},
            }
        )
        if stage_name == "optimize":
            expected = (metrics.get("expected_fusion") or {}).get("Attention")
            fusion = {
                "fused": metrics.get("attention_fused"),
                "expected": expected,
                "complete": metrics.get("attention_fusion_complete"),
            }
        kind = metrics.get("kind") or (manifest.get("config") or {}).get("kind")
        if stage_name == "prune" and kind == "unstructured":
            sparsity = {"kind": "unstructured", "sparsity": metrics.get("sparsity")}
            share = (
                f" (sparsity {metrics['sparsity']:.0%})" if isinstance(metrics.get("sparsity"), float) else ""
            )
            notes.append(UNSTRUCTURED_NOTE + share)
        if stage_name == "adapters":
            keys = (
                "adapters",
                "perplexity",
                "own_domain_perplexity_gain",
                "parity_max_abs_diff",
                "adapter_bytes",
            )
            adapters = {key: metrics.get(key) for key in keys}
            notes.append(ADAPTERS_NOTE)
    return {
        "stages": stages,
        "attention_fusion": fusion,
        "sparsity": sparsity,
        "adapters": adapters,
        "notes": notes,
    }


def load_measurements(folder: Path) -> dict[str, Any]:
    """The measurements a validate stage wrote into `folder`."""
    return json.loads((Path(folder) / MEASUREMENTS).read_text(encoding="utf-8"))
