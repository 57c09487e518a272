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

Every ONNX model runs with the same session options as validation (pipeline.onnx.session), so
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

from pipeline.errors import RecipeError, first_line
from pipeline.peers.results import summarize_result, write_results

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
    from pipeline.onnx.io import count_ops

    ops = count_ops(onnx_path, (*INT8_OPS, *INT4_OPS))
    if any(ops[op] for op in INT4_OPS):
        return "int4"
    return "int8" if any(ops.values()) else "fp32"


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {first_line(err)}"


def _ort_candidate(
    name: str, role: str, what: str, path: Path, threads: int, artifact: str | None
) -> Candidate:
    """An ONNX model in a session with validation's options, as a timed and scored candidate."""
    from pipeline.onnx.session import open_session
    from pipeline.tasks import ort_forward

    session = open_session(path, threads=threads)
    return Candidate(
        name,
        role,
        what,
        precision_of(path),
        ort_forward(session),
        [i.name for i in session.get_inputs()],
        artifact=artifact,
    )


def _olive_candidate(checkpoint: Path, task: str, work: Path, threads: int) -> Candidate:
    """Microsoft Olive's one-command CPU path (`olive auto-opt ... --precision int8`) on the same
    checkpoint: export, its graph clean-up and fusions, dynamic INT8. Telemetry off (it posts to a
    Microsoft endpoint by default, and retries without a network)."""
    import shutil
    import subprocess
    import sys

    name, what = "olive-auto-opt-int8", "Olive 0.13: olive auto-opt --device cpu --precision int8"
    olive = shutil.which("olive", path=str(Path(sys.executable).parent))
    if olive is None:
        return Candidate(
            name, "peer", what, "int8", None, error="olive-ai is not installed (pip install .[peers])"
        )
    out = work / "olive"
    command = [
        olive, "auto-opt", "-m", str(checkpoint), "--task", task, "--device", "cpu",
        "--provider", "CPUExecutionProvider", "--precision", "int8", "--output_path", str(out),
        "--disable_telemetry", "--log_level", "3",
    ]  # fmt: skip
    env = {**os.environ, "OLIVE_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env)
    except subprocess.TimeoutExpired:
        return Candidate(name, "peer", what, "int8", None, error="olive auto-opt took over 30 minutes")
    models = sorted(out.rglob("*.onnx")) if out.exists() else []
    if done.returncode != 0 or not models:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        return Candidate(name, "peer", what, "int8", None, error=f"exit {done.returncode}: {last[:200]}")
    try:
        return _ort_candidate(name, "peer", what, models[0], threads, artifact=None)
    except Exception as err:  # its model may not load with our session options
        return Candidate(name, "peer", what, "int8", None, error=_error_text(err))


def _optimum_candidates(export_dir: Path, work: Path, preset: str, threads: int) -> list[Candidate]:
    """Optimum's O2 + preset quantization, and the preset on the plain export."""
    from optimum.onnxruntime import ORTOptimizer, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig, AutoQuantizationConfig

    from pipeline.onnx.io import model_file

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
            log.info("bench: %s failed: %s", name, _error_text(err))
            return Candidate(name, "peer", what, "int8", None, error=_error_text(err))

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


def released_vs_peers(
    rows: dict[str, dict[str, Any]], times: dict[str, dict[str, list[float]]], block: int, confidence: float
) -> dict[str, dict[str, dict[str, Any]]]:
    """How much faster the released variant is than each peer, with the interval over the
    interleaved turns: {peer: {shape key: {ratio, low, high, ...}}}."""
    from pipeline.bench.stats import ratio_interval

    released = next((n for n, r in rows.items() if r.get("released") and n in times), None)
    if released is None:
        return {}
    return {
        peer: {
            key: ratio_interval(by_shape[key], times[released][key], block, confidence=confidence)
            for key in by_shape
        }
        for peer, by_shape in times.items()
        if rows[peer]["role"] == "peer"
    }


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
    from pipeline.bench import summarize, time_shapes, torch_threads
    from pipeline.bench.ceiling import matmul_flops, measure_ceilings, model_kernel_ms, weight_matmuls
    from pipeline.bench.stats import ratio_interval, turn_medians
    from pipeline.config import load_recipe, shape_key
    from pipeline.data import DataBundle, examples_digest
    from pipeline.fingerprint import machine_fingerprint
    from pipeline.model_source import random_weights
    from pipeline.onnx.io import model_file
    from pipeline.onnx.session import session_options
    from pipeline.runner import Runner
    from pipeline.tasks import Evaluator, dummy_inputs, get_task

    recipe = load_recipe(recipe_path, overrides)
    if recipe.data.eval is None:
        raise RecipeError(f"{recipe_path}: data.eval: bench needs eval data to score every candidate")
    lat = recipe.validate_.latency
    threads = lat.threads
    plan = Runner(recipe, exported=exported).run().plan
    if recipe.model.task == "text-generation":
        from pipeline.peers.decoder import run_decoder_benchmark

        report_path = plan.root / "report.json"
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        return run_decoder_benchmark(recipe, plan, report, out_dir, iters, warmup, block, settle)
    machine = machine_fingerprint()

    baseline_dir = plan.baseline_dir()
    export_node = plan.plain_export_node()
    if export_node is None:
        raise RecipeError(
            f"{recipe_path}: variants: bench needs one variant without pruning (the plain export)"
        )
    export_dir = export_node.folder
    report_path = plan.root / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    released = (report.get("release") or {}).get("variant")

    task = get_task(recipe.model.task)
    examples = list(DataBundle.from_recipe(recipe).get("eval"))
    if recipe.validate_.max_eval_examples:
        examples = examples[: recipe.validate_.max_eval_examples]
    evaluator = Evaluator.for_checkpoint(
        task,
        baseline_dir,
        examples,
        recipe.model.max_length,
        recipe.validate_.eval_batch_size,
        recipe.model.trust_remote_code,
    )
    vocab_size = int(json.loads((baseline_dir / "config.json").read_text())["vocab_size"])
    metric_name = task.headline_metric(recipe.validate_.metric, examples)
    preset = optimum_preset(machine)
    winner = (report.get("search") or {}).get("winner")
    validated = {**plan.variants, **({winner: plan.candidates[winner]} if winner in plan.candidates else {})}
    # Weight MatMul shapes per variant, read once per export (dense variants share one).
    shapes_of_export: dict[Path, Counter[tuple[int, int]]] = {}
    for node in validated.values():
        folder = node.export_node().folder
        if folder not in shapes_of_export:
            shapes_of_export[folder] = weight_matmuls(model_file(folder))
    plain_shapes = shapes_of_export[export_dir]
    variant_shapes = {name: shapes_of_export[n.export_node().folder] for name, n in validated.items()}
    torch_names = list(evaluator.tokenizer.model_input_names)

    with torch_threads(threads), tempfile.TemporaryDirectory(prefix="bench-") as work:
        model = task.load_model(baseline_dir, trust_remote_code=recipe.model.trust_remote_code)
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
        log.info("bench: olive auto-opt on %s ...", baseline_dir)
        candidates.append(_olive_candidate(baseline_dir, recipe.model.task, Path(work), threads))
        by_folder = {str(export_dir): candidates[2]}
        for name, node in validated.items():
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
                    "agreement_with_pytorch": round(task.agreement(predictions, reference), 6),
                }
            )
            log.info("bench: %s %s = %.4f", entry.name, metric_name, row["metric"])

        # -- speed: all candidates interleaved, one shape at a time --------------------------------------
        timed = [c for c in candidates if c.forward is not None]
        shapes = [(b, s) for b in lat.batch_sizes for s in lat.seq_lens]

        def calls_of(entry: Candidate, batch: int, seq: int) -> dict[str, Callable[[], Any]]:
            inputs = dummy_inputs(entry.input_names, batch, seq, vocab_size, seed=0)
            return {"": lambda: entry.forward(inputs)}

        def log_shape(key: str, times: dict[str, dict[str, list[float]]]) -> None:
            log.info(
                "bench: %s p50 ms: %s",
                key,
                ", ".join(f"{n} {np.median(t['']):.2f}" for n, t in times.items()),
            )

        times, quality = time_shapes(
            {entry.name: entry for entry in timed},
            shapes,
            calls_of,
            warmup=warmup,
            iters=iters,
            block=block,
            settle=settle,
            on_shape=log_shape,
            on_retry=lambda key, n, reasons: log.warning("bench: %s round %d disturbed: %s", key, n, reasons),
            max_rounds=lat.max_rounds,
            max_other_cpu=lat.max_other_cpu,
            max_turn_spread=lat.max_turn_spread,
        )
        base_name = "pytorch-eager-fp32"
        for batch, seq in shapes:
            key = shape_key(batch, seq)
            for name, by_shape in times.items():
                ms = by_shape[key][""]
                rows[name].setdefault("latency", {})[key] = summarize(ms, batch)
                rows[name]["latency"][key]["turn_medians_ms"] = turn_medians(ms, block)
                interval = ratio_interval(times[base_name][key][""], ms, block, confidence=lat.confidence)
                rows[name].setdefault("speedup_ci", {})[key] = [interval["low"], interval["high"]]
        raw_times = {name: {key: by_shape[key][""] for key in by_shape} for name, by_shape in times.items()}
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
            "timing_quality": quality,
            "confidence": lat.confidence,
        },
        "random_weights": random_weights(baseline_dir),
        "released_variant": released,
        "ceilings": ceilings,
        "weight_matmuls": {f"{k}x{n}": c for (k, n), c in sorted(plain_shapes.items())},
        "candidates": rows,
        "released_vs_peers": released_vs_peers(rows, raw_times, block, lat.confidence),
    }
    result["summary"] = summarize_result(result)
    write_results(result, Path(out_dir))
    return result
