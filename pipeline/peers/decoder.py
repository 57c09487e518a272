"""`bench` for decoders: this pipeline's variants beside PyTorch and ONNX Runtime GenAI's builder.

onnxruntime-genai ships a model builder (`python -m onnxruntime_genai.models.builder -i FOLDER -o
OUT -p int4|int8|fp32 -e cpu`): what a deployer of an ONNX LLM would otherwise run. Its models keep
the same input/output names as optimum's KV-cache layout (input_ids, attention_mask,
past_key_values.N.key/value -> logits, present.N.key/value; no position_ids: its
GroupQueryAttention computes them), so every candidate is fed the SAME token ids by this
package's own loop: perplexity on the same windows, greedy tokens against PyTorch's generate(),
prefill and per-token decode timed interleaved in one process. The builder's own tokenizer is
not used (compare on ids: DESIGN.md §7).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger("pipeline")
BUILDER_PRECISIONS = ("fp32", "int8", "int4")
GENAI_INT4 = "genai-builder-int4"  # the peer the decode target is set against


def build_genai(checkpoint: Path, out: Path, precision: str) -> tuple[Path | None, str | None, float]:
    """(model.onnx, None, seconds) or (None, why, seconds): the GenAI builder's model for `checkpoint`."""
    started = time.perf_counter()
    command = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(checkpoint), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out / "cache"),
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return None, "the builder took over 30 minutes", time.perf_counter() - started
    seconds = time.perf_counter() - started
    model = out / "model.onnx"
    if done.returncode != 0 or not model.is_file():
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        return None, f"exit {done.returncode}: {last[:200]}", seconds
    shutil.rmtree(out / "cache", ignore_errors=True)
    return model, None, seconds


class _FixedDims:
    """An InferenceSession whose inputs read with some symbolic dimensions replaced by numbers."""

    def __init__(self, session: Any, dims: dict[str, int]) -> None:
        from types import SimpleNamespace

        self._session = session
        self._inputs = [
            SimpleNamespace(name=i.name, type=i.type, shape=[dims.get(d, d) for d in i.shape])
            for i in session.get_inputs()
        ]

    def get_inputs(self) -> list[Any]:
        return self._inputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def with_genai_dims(session: Any, folder: Path) -> Any:
    """`session` of a GenAI builder model, its KV head dimension made a number: the builder names
    it symbolically ('kv_cache_dim'), and this package's loop needs it to make the empty past. The
    number comes from the builder's own genai_config.json (model.decoder.head_size)."""
    import json

    config = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))
    head_size = int(config["model"]["decoder"]["head_size"])
    symbolic = {d for i in session.get_inputs() if i.name.startswith("past_key_values.") for d in i.shape[3:]}
    dims = {d: head_size for d in symbolic if isinstance(d, str)}
    return _FixedDims(session, dims) if dims else session


def run_decoder_benchmark(
    recipe: Any,
    plan: Any,
    report: dict[str, Any],
    out_dir: Path,
    iters: int,
    warmup: int,
    block: int,
    settle: int,
) -> dict[str, Any]:
    """Score and time PyTorch, every validated variant and the GenAI builder's models."""
    from pipeline import manifest as mf
    from pipeline.bench import speedups, summarize, time_shapes, torch_threads
    from pipeline.bench.stats import ratio_interval
    from pipeline.config import shape_key
    from pipeline.data import DataBundle
    from pipeline.fingerprint import machine_fingerprint
    from pipeline.onnx.io import model_bytes, model_file, vocab_size
    from pipeline.onnx.session import open_session
    from pipeline.peers.results import write_results
    from pipeline.tasks import get_task

    task = get_task(recipe.model.task)
    validate = recipe.validate_
    lat = validate.latency
    baseline_dir = plan.baseline_dir()
    examples = list(DataBundle.from_recipe(recipe).get("eval"))[: validate.max_eval_examples]
    released = (report.get("release") or {}).get("variant")
    shapes = [(1, s) for s in lat.seq_lens]
    rows: dict[str, dict[str, Any]] = {}
    with torch_threads(lat.threads), tempfile.TemporaryDirectory(prefix="bench-genai-") as work:
        scorer = task.scorer(
            baseline_dir,
            examples,
            max_length=recipe.model.max_length,
            batch_size=validate.eval_batch_size,
            trust_remote_code=recipe.model.trust_remote_code,
            generation=validate.generation,
        )
        model = task.load_model(baseline_dir, trust_remote_code=recipe.model.trust_remote_code)
        base = scorer.baseline(model)
        rows["pytorch-eager-fp32"] = {
            "role": "baseline",
            "what": "PyTorch eager, fp32",
            "metrics": base.metrics,
        }
        runners: dict[str, Any] = {"pytorch-eager-fp32": model}
        folders = {name: node.folder for name, node in plan.variants.items()}
        for name, folder in folders.items():
            if name not in report.get("variants", {}):
                continue  # a variant that failed has nothing to bench
            steps = " -> ".join(n.stage for n in plan.variants[name].chain())
            rows[f"pipeline:{name}"] = {
                "role": "pipeline",
                "what": steps,
                "released": name == released,
                "path": model_file(folder),
                "size_bytes": model_bytes(folder),
            }
        for precision in BUILDER_PRECISIONS:
            name = f"genai-builder-{precision}"
            path, error, seconds = build_genai(baseline_dir, Path(work) / precision, precision)
            rows[name] = {
                "role": "peer",
                "what": f"onnxruntime-genai builder -p {precision} -e cpu",
                "build_s": round(seconds, 1),
            }
            if error:
                rows[name]["error"] = error
                log.info("bench: %s failed: %s", name, error)
            else:
                rows[name].update({"path": path, "size_bytes": model_bytes(path.parent)})
        for name, row in rows.items():
            if "path" not in row:
                continue
            try:
                session = open_session(row["path"], threads=lat.threads)
                if row["role"] == "peer":
                    session = with_genai_dims(session, Path(row["path"]).parent)
                scored = scorer.variant(session, name)
            except Exception as err:  # a peer model this loop cannot drive is a finding, reported
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                continue
            row.update(
                {"metrics": scored.metrics, "first_divergence": scored.extra["greedy"]["first_divergence"]}
            )
            runners[name] = session
            log.info(
                "bench: %s perplexity %.3f, greedy agreement %.3f",
                name,
                scored.metrics["perplexity"],
                scored.agreement,
            )
        vocab = vocab_size(baseline_dir)
        times, quality = time_shapes(
            runners,
            shapes,
            lambda runner, batch, seq: task.timed_calls(runner, batch, seq, vocab, lat),
            warmup=warmup,
            iters=iters,
            block=block,
            settle=settle,
            max_rounds=lat.max_rounds,
            max_other_cpu=lat.max_other_cpu,
            max_turn_spread=lat.max_turn_spread,
        )
        del runners, model
    base_key = "pytorch-eager-fp32"
    for name, by_shape in times.items():
        latency = {
            shape_key(b, s): task.latency_entry(
                {c: summarize(ms, b) for c, ms in by_shape[shape_key(b, s)].items()}, b, s
            )
            for b, s in shapes
        }
        rows[name]["latency"] = latency
    for name, row in rows.items():
        row.pop("path", None)
        if "latency" not in row or name == base_key:
            continue
        row["decode_speedup_vs_pytorch"] = speedups(rows[base_key]["latency"], row["latency"])
        row["decode_speedup_ci"] = {
            key: [ci["low"], ci["high"]]
            for key in row["latency"]
            for ci in [ratio_interval(times[base_key][key]["decode"], times[name][key]["decode"], block)]
        }
        if name.startswith("pipeline:") and GENAI_INT4 in times:  # ratio > 1: this variant is faster
            row["decode_vs_genai_int4_ci"] = {
                key: [ci["low"], ci["high"]]
                for key in row["latency"]
                for ci in [
                    ratio_interval(times[GENAI_INT4][key]["decode"], times[name][key]["decode"], block)
                ]
            }
    result = {
        "format_version": 1,
        "kind": "decoder",
        "recipe": recipe.name,
        "task": recipe.model.task,
        "metric_name": "perplexity",
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_fingerprint(),
        "versions": mf.versions(),
        "settings": {
            "threads": lat.threads,
            "iters": iters,
            "warmup": warmup,
            "block": block,
            "settle": settle,
            "shapes": [shape_key(b, s) for b, s in shapes],
            "eval_examples": len(examples),
            "text": scorer.settings.get("decoder_text"),
            "generation": validate.generation.model_dump(),
            "timing_quality": quality,
        },
        "released_variant": released,
        "candidates": rows,
    }
    result["summary"] = summarize_decoder(result)
    write_results(result, Path(out_dir))
    return result


def summarize_decoder(result: dict[str, Any]) -> dict[str, Any]:
    """The released variant vs the GenAI builder's int4 model: decode ms/token and perplexity."""
    rows = result["candidates"]
    released = next((n for n, r in rows.items() if r.get("released")), None)
    peer = rows.get(GENAI_INT4) or {}
    summary: dict[str, Any] = {"released": released}
    if released and "latency" in peer and "latency" in rows[released]:
        rel = rows[released]
        summary["released_vs_genai_int4"] = {
            key: round(peer["latency"][key]["p50_ms"] / rel["latency"][key]["p50_ms"], 3)
            for key in rel["latency"]
        }
        summary["perplexity_released"] = rel["metrics"]["perplexity"]
        summary["perplexity_genai_int4"] = peer["metrics"]["perplexity"]
    # The bar: this pipeline's fastest variant at the last context whose perplexity is no
    # worse than the builder's int4.
    if "latency" in peer:
        last = list(peer["latency"])[-1]
        eligible = [
            name
            for name, row in rows.items()
            if name.startswith("pipeline:")
            and "latency" in row
            and row["metrics"]["perplexity"] <= peer["metrics"]["perplexity"]
        ]
        if eligible:
            best = min(eligible, key=lambda name: rows[name]["latency"][last]["p50_ms"])
            summary["best_vs_genai_int4"] = {
                "variant": best,
                "perplexity": rows[best]["metrics"]["perplexity"],
                "ratio": {
                    key: round(peer["latency"][key]["p50_ms"] / rows[best]["latency"][key]["p50_ms"], 3)
                    for key in rows[best]["latency"]
                },
                "ci": rows[best].get("decode_vs_genai_int4_ci", {}),
            }
    summary["failed"] = {n: r["error"] for n, r in rows.items() if r.get("error")}
    return summary


def render_decoder_section(result: dict[str, Any]) -> str:
    """Markdown for one decoder recipe's result."""
    from pipeline.report.render import markdown_table

    settings, machine = result["settings"], result["machine"]
    keys = settings["shapes"]
    base = result["candidates"]["pytorch-eager-fp32"]["metrics"]["perplexity"]
    header = ["Candidate", "What", "perplexity", "vs PyTorch", "greedy agreement", "size MB"]
    for key in keys:
        header += [f"prefill ms {key}", f"decode ms/token {key}", "decode x PyTorch"]
    lines = [
        f"## {result['recipe']} ({result['task']}, perplexity: lower is better)",
        "",
        f"Measured {result['generated_at']} on {machine.get('cpu_model')} ({machine.get('cores')} cores), "
        f"{settings['threads']} threads, batch 1, {settings['iters']} timed runs per call in turns of "
        f"{settings['block']}; text {settings.get('text')}; greedy {settings['generation']}. Every model is "
        "fed the same token ids by this package's loop.",
        "",
    ]
    rows = []
    for name, row in result["candidates"].items():
        label = f"**{name}** (released)" if row.get("released") else name
        if row.get("error"):
            rows.append([label, row["what"], "failed", row["error"], *["-"] * (len(header) - 4)])
            continue
        ppl = row["metrics"]["perplexity"]
        cells = [
            label,
            row["what"],
            f"{ppl:.3f}",
            f"{(ppl / base - 1) * 100:+.2f}%",
            f"{row['metrics'].get('token_agreement', 1.0):.3f}",
            f"{row['size_bytes'] / 1e6:.0f}" if row.get("size_bytes") else "-",
        ]
        for key in keys:
            stats = row["latency"][key]
            ratio = (row.get("decode_speedup_vs_pytorch") or {}).get(key)
            ci = (row.get("decode_speedup_ci") or {}).get(key)
            cells += [
                "-" if stats["prefill_ms_p50"] is None else f"{stats['prefill_ms_p50']:.1f}",
                f"{stats['p50_ms']:.2f}",
                "1.00x"
                if ratio is None
                else f"{ratio:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""),
            ]
        rows.append(cells)
    lines += [markdown_table(header, rows), ""]
    summary = result["summary"]
    if "released_vs_genai_int4" in summary:
        ratios = ", ".join(f"{v:.2f}x at {k}" for k, v in summary["released_vs_genai_int4"].items())
        lines.append(
            f"- Released `{summary['released']}` decode speed vs the GenAI builder's int4: "
            f"{ratios}; perplexity {summary['perplexity_released']:.3f} "
            f"vs {summary['perplexity_genai_int4']:.3f}."
        )
    best = summary.get("best_vs_genai_int4")
    if best:
        ratios = ", ".join(
            f"{v:.2f}x at {k}"
            + (f" [{best['ci'][k][0]:.2f}, {best['ci'][k][1]:.2f}]" if k in best["ci"] else "")
            for k, v in best["ratio"].items()
        )
        lines.append(
            f"- Fastest variant with perplexity no worse than the GenAI builder's int4: `{best['variant']}` "
            f"({best['perplexity']:.3f}), decode speed vs that int4: {ratios} (above 1: faster)."
        )
    for name, error in summary.get("failed", {}).items():
        lines.append(f"- `{name}` failed: {error}")
    return "\n".join(lines) + "\n"
