"""`python -m pipeline bench RECIPE`: this pipeline side by side with what a user would otherwise run.

On the same model, the same eval data and the same machine, in one process with interleaved timing
(pipeline.bench.interleaved), it measures the task metric and the latency (p50, p90 at every
validate.latency batch size and sequence length of the recipe) of:

1. PyTorch eager fp32 (the baseline every ratio refers to);
2. PyTorch's own dynamic INT8 (`torch.ao.quantization.quantize_dynamic` on every Linear);
3. ONNX Runtime on the plain export, no offline optimization;
4. Optimum's ready-made path: `ORTOptimizer` at O2, then `ORTQuantizer` with the
   `AutoQuantizationConfig` preset matching this CPU (avx512_vnni / avx512 / avx2 / arm64), and the
   same preset applied to the plain export (the route that works where O2 + quantize fails);
5. every variant of the recipe, the released one marked.

Every ONNX model runs with the same session options as validation (pipeline.stages.validate), so
the comparison is of the models, not of the settings. The same run measures this machine's matrix
ceilings on the model's own weight shapes (pipeline.bench.ceiling) and reports for each candidate
the share of its latency that the ideal matrix work alone would take.

The recipe is run first (cached: nothing is recomputed when it has run before). Results go to
`<out>/results/<recipe>.json`; `<out>/RESULTS.md` is regenerated from every JSON there.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError, RecipeError

log = logging.getLogger("pipeline")

INT8_OPS = (
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QAttention",
    "QLinearMatMul",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
)
INT4_OPS = ("MatMulNBits",)


@dataclass
class Candidate:
    """One thing timed and scored."""

    name: str
    role: str  # baseline | peer | pipeline
    what: str
    precision: str  # fp32 | int8 | int4
    forward: Callable[[dict[str, np.ndarray]], np.ndarray] | None  # None: could not be built
    input_names: list[str] = field(default_factory=list)
    artifact: str | None = None
    error: str | None = None
    released: bool = False
    same_as: list[str] = field(default_factory=list)  # recipe variants that are this very artifact


def optimum_preset(machine: dict[str, Any]) -> str:
    """The AutoQuantizationConfig preset Optimum's docs point a user of this CPU to."""
    flags = machine.get("flags", {})
    if machine.get("arch") in ("aarch64", "arm64"):
        return "arm64"
    if flags.get("avx512_vnni"):
        return "avx512_vnni"
    if flags.get("avx512"):
        return "avx512"
    return "avx2"


def precision_of(onnx_path: Path) -> str:
    """int4 / int8 / fp32 from the op types of a graph."""
    from pipeline.onnx_utils import count_ops

    ops = count_ops(onnx_path, (*INT8_OPS, *INT4_OPS))
    if any(ops[op] for op in INT4_OPS):
        return "int4"
    return "int8" if any(ops.values()) else "fp32"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".strip()


def _ort_candidate(
    name: str, role: str, what: str, path: Path, threads: int, artifact: str | None
) -> Candidate:
    """An ONNX model in a session with validation's options, as a timed and scored candidate."""
    from pipeline.stages.validate import CPU, make_session, ort_forward

    session = make_session(path, CPU, threads)
    return Candidate(
        name,
        role,
        what,
        precision_of(path),
        ort_forward(session),
        [i.name for i in session.get_inputs()],
        artifact=artifact,
    )


def _optimum_candidates(export_dir: Path, work: Path, preset: str, threads: int) -> list[Candidate]:
    """Optimum's O2 + preset quantization, and the preset on the plain export."""
    from optimum.onnxruntime import ORTOptimizer, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig, AutoQuantizationConfig

    from pipeline.onnx_utils import model_file

    def quantized(source_dir: Path, file_name: str, save_dir: Path) -> Path:
        quantizer = ORTQuantizer.from_pretrained(source_dir, file_name=file_name)
        config = getattr(AutoQuantizationConfig, preset)(is_static=False)
        quantizer.quantize(quantization_config=config, save_dir=save_dir)
        return next(save_dir.glob("*_quantized.onnx"))

    def candidate(name: str, what: str, build: Callable[[], Path]) -> Candidate:
        # A peer that cannot build its model is a finding of the benchmark (reported in its row),
        # not a failure of this run.
        try:
            # Optimum writes into a temporary folder that is not kept: no artifact path to record.
            return _ort_candidate(name, "peer", what, build(), threads, artifact=None)
        except Exception as err:  # optimum and ORT raise many unrelated types
            log.info("bench: %s failed: %s", name, _first_line(err))
            return Candidate(name, "peer", what, "int8", None, error=_first_line(err))

    def o2_then_preset() -> Path:
        optimizer = ORTOptimizer.from_pretrained(export_dir, file_names=[model_file(export_dir).name])
        optimizer.optimize(optimization_config=AutoOptimizationConfig.O2(), save_dir=work / "o2")
        return quantized(work / "o2", "model_optimized.onnx", work / "o2-quantized")

    return [
        candidate(
            f"optimum-O2+{preset}",
            f"Optimum: ORTOptimizer O2, then ORTQuantizer {preset}(is_static=False)",
            o2_then_preset,
        ),
        candidate(
            f"optimum-{preset}",
            f"Optimum: ORTQuantizer {preset}(is_static=False) on the plain export",
            lambda: quantized(export_dir, model_file(export_dir).name, work / "plain-quantized"),
        ),
    ]


def run_benchmark(
    recipe_path: Path,
    overrides: list[str],
    exported: Path,
    out_dir: Path,
    iters: int,
    warmup: int,
    block: int,
    settle: int,
) -> dict[str, Any]:
    """Run the recipe (cached), measure every candidate, write the JSON and RESULTS.md."""
    # Timed runtimes take turns in one process: a thread pool that busy-waits after its run would
    # steal the cores of the next one. OpenMP (PyTorch) reads this before it starts.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from pipeline import manifest as mf
    from pipeline.bench import interleaved, shape_key, summarize, torch_threads
    from pipeline.bench.ceiling import matmul_flops, measure_ceilings, model_kernel_ms, weight_matmuls
    from pipeline.data import DataBundle, examples_digest
    from pipeline.decoder.tiny import random_weights
    from pipeline.fingerprint import machine_fingerprint
    from pipeline.onnx_utils import dummy_inputs, model_file
    from pipeline.recipe import load_recipe
    from pipeline.runner import Runner
    from pipeline.stages.validate import Evaluator, prediction_agreement, resolve_metric, session_options
    from pipeline.tasks import get_task

    recipe = load_recipe(recipe_path, overrides)
    if recipe.model.task == "text-generation":
        raise RecipeError(
            f"{recipe_path}: bench compares encoder models; task text-generation is not supported"
        )
    if recipe.data.eval is None:
        raise RecipeError(f"{recipe_path}: data.eval: bench needs eval data to score every candidate")
    lat = recipe.validate_.latency
    threads = lat.threads
    plan = Runner(recipe, exported=exported).run().plan
    machine = machine_fingerprint()

    baseline_dir = plan.baseline_dir()
    export_node = plan.plain_export_node()
    if export_node is None:
        raise RecipeError(
            f"{recipe_path}: variants: bench needs one variant without pruning (the plain export)"
        )
    export_dir = export_node.folder
    report_path = plan.root / "report.json"
    released = json.loads(report_path.read_text())["release"].get("variant") if report_path.exists() else None

    task = get_task(recipe.model.task)
    examples = list(DataBundle(recipe).get("eval"))
    if recipe.validate_.max_eval_examples:
        examples = examples[: recipe.validate_.max_eval_examples]
    evaluator = Evaluator.for_checkpoint(
        task, baseline_dir, examples, recipe.model.max_length, recipe.validate_.eval_batch_size
    )
    vocab_size = int(json.loads((baseline_dir / "config.json").read_text())["vocab_size"])
    metric_name = resolve_metric(recipe.validate_, task.name, examples)
    preset = optimum_preset(machine)
    # Weight MatMul shapes per variant, read once per export (dense variants share one).
    shapes_of_export: dict[Path, Counter[tuple[int, int]]] = {}
    for node in plan.variants.values():
        folder = node.export_node().folder
        if folder not in shapes_of_export:
            shapes_of_export[folder] = weight_matmuls(model_file(folder))
    plain_shapes = shapes_of_export[export_dir]
    variant_shapes = {name: shapes_of_export[n.export_node().folder] for name, n in plan.variants.items()}
    torch_names = list(evaluator.tokenizer.model_input_names)

    with torch_threads(threads), tempfile.TemporaryDirectory(prefix="bench-") as work:
        model = task.load_model(baseline_dir)
        with warnings.catch_warnings():  # deprecated in favour of torchao, still what users run
            warnings.simplefilter("ignore")
            quantized_model = torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8
            )
        candidates = [
            Candidate(
                "pytorch-eager-fp32",
                "baseline",
                f"PyTorch {torch.__version__} eager, fp32",
                "fp32",
                task.torch_forward(model),
                torch_names,
                str(baseline_dir),
            ),
            Candidate(
                "pytorch-dynamic-int8",
                "peer",
                "torch.ao.quantization.quantize_dynamic(Linear, qint8)",
                "int8",
                task.torch_forward(quantized_model),
                torch_names,
            ),
        ]

        def ort_candidate(name: str, role: str, what: str, folder: Path) -> Candidate:
            return _ort_candidate(name, role, what, model_file(folder), threads, artifact=str(folder))

        candidates.append(
            ort_candidate(
                "ort-plain-export",
                "peer",
                "ONNX Runtime on the plain export (no offline optimization)",
                export_dir,
            )
        )
        candidates.extend(_optimum_candidates(export_dir, Path(work), preset, threads))
        by_folder = {str(export_dir): candidates[2]}
        for name, node in plan.variants.items():
            folder = str(node.folder)
            if folder in by_folder:  # e.g. variant fp32 is the plain export itself
                by_folder[folder].same_as.append(name)
                by_folder[folder].released |= name == released
                continue
            chain = node.chain()
            steps = " -> ".join(n.stage for n in chain if n.stage != "finetune")
            entry = ort_candidate(f"pipeline:{name}", "pipeline", steps, node.folder)
            entry.released = name == released
            by_folder[folder] = entry
            candidates.append(entry)

        # -- accuracy on the eval split -------------------------------------------------------------
        rows: dict[str, dict[str, Any]] = {}
        reference = None
        for entry in candidates:
            row: dict[str, Any] = {
                "role": entry.role,
                "what": entry.what,
                "precision": entry.precision,
                "artifact": entry.artifact,
                "released": entry.released,
                "same_as": entry.same_as,
            }
            rows[entry.name] = row
            if entry.forward is None:
                row["error"] = entry.error
                continue
            predictions = evaluator.predict(entry.forward, entry.name)
            if reference is None:
                reference = predictions
            metrics = evaluator.score(predictions, reference=reference)
            row.update(
                {
                    "metric": metrics.get(metric_name),
                    "metrics": metrics,
                    "agreement_with_pytorch": round(
                        prediction_agreement(task.name, predictions, reference), 6
                    ),
                }
            )
            log.info("bench: %s %s = %.4f", entry.name, metric_name, row["metric"])

        # -- speed: all candidates interleaved, one shape at a time --------------------------------------
        timed = [c for c in candidates if c.forward is not None]
        shapes = [(b, s) for b in lat.batch_sizes for s in lat.seq_lens]
        for batch, seq in shapes:
            key = shape_key(batch, seq)
            calls = {}
            for entry in timed:
                inputs = dummy_inputs(entry.input_names, batch, seq, vocab_size, seed=0)
                calls[entry.name] = lambda fn=entry.forward, inputs=inputs: fn(inputs)
            times = interleaved(calls, warmup=warmup, iters=iters, block=block, settle=settle)
            for name, ms in times.items():
                rows[name].setdefault("latency", {})[key] = summarize(ms, batch)
            log.info(
                "bench: %s p50 ms: %s",
                key,
                ", ".join(f"{n} {rows[n]['latency'][key]['p50_ms']:.2f}" for n in times),
            )
        del model, quantized_model, candidates, timed

    # -- ceilings on the model's weight shapes, after the models are freed ----------------------------
    all_shapes = {shape for shapes_of in shapes_of_export.values() for shape in shapes_of}
    tokens = sorted({b * s for b, s in shapes})
    log.info("bench: matrix ceilings for %d weight shapes at %s tokens", len(all_shapes), tokens)
    ceilings = measure_ceilings(all_shapes, tokens, threads, iters=max(20, iters // 2), warmup=warmup)

    base = rows["pytorch-eager-fp32"]
    for name, row in rows.items():
        if "latency" not in row:
            continue
        counts = plain_shapes
        if name.startswith("pipeline:"):
            counts = variant_shapes[name.removeprefix("pipeline:")]
        row["matmul_gflop"] = {}
        row["speedup_vs_pytorch"] = {}
        row["ceiling_fraction"] = {}
        for batch, seq in shapes:
            key = shape_key(batch, seq)
            p50 = row["latency"][key]["p50_ms"]
            row["speedup_vs_pytorch"][key] = round(base["latency"][key]["p50_ms"] / p50, 3)
            row["matmul_gflop"][key] = round(matmul_flops(counts, batch * seq) / 1e9, 3)
            if row["precision"] in ("fp32", "int8"):
                ideal = model_kernel_ms(ceilings, row["precision"], batch * seq, counts)
                row["ceiling_fraction"][key] = round(ideal / p50, 3)
        if row.get("metric") is not None and base.get("metric") is not None:
            row["metric_delta_vs_pytorch"] = round(row["metric"] - base["metric"], 5)

    result = {
        "format_version": 1,
        "recipe": recipe.name,
        "recipe_file": str(recipe_path),
        "overrides": list(overrides),
        "task": recipe.model.task,
        "metric_name": metric_name,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "versions": mf.versions(),
        "settings": {
            "threads": threads,
            "iters": iters,
            "warmup": warmup,
            "block": block,
            "settle": settle,
            "shapes": [shape_key(b, s) for b, s in shapes],
            "eval_examples": len(examples),
            "eval_data_sha256": examples_digest(examples),
            "session_options": session_options(threads),
            "optimum_preset": preset,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
        "random_weights": random_weights(baseline_dir),
        "released_variant": released,
        "ceilings": ceilings,
        "weight_matmuls": {f"{k}x{n}": c for (k, n), c in sorted(plain_shapes.items())},
        "candidates": rows,
    }
    result["summary"] = summarize_result(result)
    write_results(result, Path(out_dir))
    return result


# -- summary and RESULTS.md --------------------------------------------------------------------------


def summarize_result(result: dict[str, Any]) -> dict[str, Any]:
    """The comparisons a reader looks for, computed from the rows (no new measurement)."""
    rows = result["candidates"]
    shapes = result["settings"]["shapes"]
    measured = {n: r for n, r in rows.items() if "latency" in r}
    released = next((n for n, r in measured.items() if r["released"]), None)
    optimum = [n for n, r in measured.items() if n.startswith("optimum-")]
    # The Optimum route a user would keep: its fastest working one at the first shape.
    optimum_best = min(optimum, key=lambda n: measured[n]["latency"][shapes[0]]["p50_ms"], default=None)
    pipeline_rows = {n: r for n, r in measured.items() if r["role"] == "pipeline" or r["same_as"]}
    summary: dict[str, Any] = {"released": released, "optimum_reference": optimum_best}
    if released and optimum_best:
        rel, opt = measured[released], measured[optimum_best]
        summary["released_vs_optimum"] = {
            key: round(opt["latency"][key]["p50_ms"] / rel["latency"][key]["p50_ms"], 3) for key in shapes
        }
        if rel.get("metric") is not None and opt.get("metric") is not None:
            summary["released_metric_minus_optimum"] = round(rel["metric"] - opt["metric"], 5)
    summary["best_vs_pytorch"] = {}
    for key in shapes:
        best = max(pipeline_rows, key=lambda n: pipeline_rows[n]["speedup_vs_pytorch"][key], default=None)
        if best:
            summary["best_vs_pytorch"][key] = {
                "candidate": best,
                "speedup": pipeline_rows[best]["speedup_vs_pytorch"][key],
            }
    dense_int8 = {
        n: r for n, r in pipeline_rows.items() if r["precision"] == "int8" and "prune" not in r["what"]
    }
    summary["dense_int8_ceiling_fraction"] = {}
    for key in shapes:
        best = max(dense_int8, key=lambda n: dense_int8[n]["ceiling_fraction"].get(key, 0), default=None)
        if best:
            summary["dense_int8_ceiling_fraction"][key] = {
                "candidate": best,
                "fraction": dense_int8[best]["ceiling_fraction"][key],
            }
    summary["failed"] = {n: r["error"] for n, r in rows.items() if r.get("error")}
    return summary


def write_results(result: dict[str, Any], out_dir: Path) -> Path:
    """Write `<out>/results/<recipe>.json` and regenerate `<out>/RESULTS.md` from every JSON there."""
    from pipeline.manifest import write_json

    results_dir = out_dir / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json(results_dir / f"{result['recipe']}.json", result)
    sections = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            sections.append(render_section(json.loads(path.read_text(encoding="utf-8"))))
        except (ValueError, KeyError) as err:
            raise InputError(
                f"{path}: not a bench result ({_first_line(err)}); delete it or rerun bench"
            ) from None
    text = RESULTS_HEADER + "\n".join(sections)
    staged = out_dir / ".RESULTS.md.tmp"
    staged.write_text(text, encoding="utf-8")
    os.replace(staged, out_dir / "RESULTS.md")
    return out_dir / "RESULTS.md"


RESULTS_HEADER = """# Benchmark results

Regenerated by `make bench` (`python -m pipeline bench RECIPE`; one section per recipe, JSON in
`results/`). Each section is ONE run on the machine it names: every candidate loaded in one process,
timed interleaved (candidates take turns, so background load hits them alike), threads pinned, the
same ONNX Runtime session options for every ONNX model. `x PyTorch` = p50 of PyTorch eager fp32 /
p50 of the candidate in that run. `ceiling` = the time ONNX Runtime's bare MatMul (fp32) or
MatMulInteger (u8s8) kernels need for the model's weight matrices at that shape, over the
candidate's p50: the share of its latency that is ideal matrix work (pipeline/bench/ceiling.py).

"""


def _ms(stats: dict[str, Any] | None) -> str:
    return f"{stats['p50_ms']:.2f} / {stats['p90_ms']:.2f}" if stats else "-"


def render_section(result: dict[str, Any]) -> str:
    """Markdown for one recipe's result."""
    machine, settings, summary = result["machine"], result["settings"], result["summary"]
    shapes = settings["shapes"]
    metric = result["metric_name"]
    flags = ", ".join(k for k, v in machine.get("flags", {}).items() if v) or "none"
    versions = ", ".join(f"{k} {v}" for k, v in result.get("versions", {}).items() if v)
    lines = [
        f"## {result['recipe']} ({result['task']}, {metric})",
        "",
        f"Measured {result['generated_at']} on {machine.get('cpu_model')} ({machine.get('cores')} cores; "
        f"{flags}), {settings['threads']} threads, {settings['iters']} timed runs per candidate and shape "
        f"(turns of {settings['block']} after {settings.get('settle', 0)} untimed), "
        f"{settings['eval_examples']} eval examples. {versions}.",
        "",
    ]
    if result.get("random_weights"):
        lines += [
            "The model has random weights (config.json pipeline_random_weights): the metric measures "
            "fidelity to the fp32 model, not a task skill; the speed figures are what this section is for.",
            "",
        ]
    header = ["Candidate", "What", "Prec.", metric, "Δ vs PyTorch"]
    for key in shapes:
        header += [f"{key} p50 / p90 ms", "x PyTorch", "ceiling"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in result["candidates"].items():
        label = f"**{name}** (released)" if row.get("released") else name
        if row.get("same_as"):
            label += f" = variant {', '.join(row['same_as'])}"
        if row.get("error"):
            cells = [label, row["what"], row["precision"], "failed", row["error"].replace("|", "/")]
            cells += ["-", "-", "-"] * len(shapes)
        else:
            delta = row.get("metric_delta_vs_pytorch")
            cells = [
                label,
                row["what"],
                row["precision"],
                f"{row['metric']:.4f}" if row.get("metric") is not None else "-",
                f"{delta:+.4f}" if delta is not None else "-",
            ]
            for key in shapes:
                fraction = row.get("ceiling_fraction", {}).get(key)
                cells += [
                    _ms(row.get("latency", {}).get(key)),
                    f"{row['speedup_vs_pytorch'][key]:.2f}x",
                    f"{fraction:.0%}" if fraction is not None else "-",
                ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Summary:", ""]
    if "released_vs_optimum" in summary:
        ratios = ", ".join(f"{v:.2f}x at {k}" for k, v in summary["released_vs_optimum"].items())
        diff = summary.get("released_metric_minus_optimum")
        lines.append(
            f"- Released variant `{summary['released']}` vs Optimum (`{summary['optimum_reference']}`): "
            f"{ratios}; {metric} {diff:+.4f}."
            if diff is not None
            else f"- Released vs Optimum: {ratios}."
        )
    elif summary.get("released") is None:
        lines.append("- No released variant (no variant passed the recipe's gates).")
    for key, best in summary.get("best_vs_pytorch", {}).items():
        lines.append(
            f"- Fastest pipeline variant at {key}: `{best['candidate']}`, "
            f"{best['speedup']:.2f}x PyTorch eager fp32."
        )
    for key, best in summary.get("dense_int8_ceiling_fraction", {}).items():
        lines.append(
            f"- Dense INT8 closest to the int8 matrix ceiling at {key}: `{best['candidate']}`, "
            f"{best['fraction']:.0%}."
        )
    for name, error in summary.get("failed", {}).items():
        lines.append(f"- `{name}` could not be built: {error}")
    ceilings = result["ceilings"]["per_shape"]
    lines += ["", "Ceilings of the bare kernels on this model's weight shapes (GOP/s at M tokens):", ""]
    lines += ["| precision | M | " + " | ".join(sorted(next(iter(ceilings["fp32"].values())))) + " |"]
    lines += ["|---|---|" + "---|" * len(next(iter(ceilings["fp32"].values())))]
    for precision, by_tokens in ceilings.items():
        for tokens, kernels in sorted(by_tokens.items(), key=lambda kv: int(kv[0])):
            cells = [f"{kernels[k]['gops']:.0f}" for k in sorted(kernels)]
            lines.append(f"| {precision} | {tokens} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
