"""Validate stage: accuracy and speed of every variant against the PyTorch baseline.

`validate_variants(...)` (called by the runner once every variant's chain has run):

1. Accuracy: the task's standard metric (pipeline.tasks) on the recipe's eval split, for the
   PyTorch fp32 checkpoint (the baseline) and every ONNX variant, on the same tokenised examples.
   Batches are built over examples sorted by length (less padding, faster) and scored in the
   original order. Agreement = share of predictions equal to the baseline's (NER: per word;
   embeddings: mean cosine to the baseline's embeddings).
2. Providers: CPUExecutionProvider always; CUDA/TensorRT when asked for and really present. A
   session is trusted only if `session.get_providers()` puts the asked-for provider first; a silent
   fallback to CPU is a StageError unless `validate.allow_provider_fallback`. Node placement comes
   from ORT's profiler (first run only). Where a provider is absent the report says so, with no
   numbers.
3. Speed: PyTorch eager fp32 and every variant x provider, at every (batch, seq) of
   validate.latency, after warm-up, threads pinned, all in this process and interleaved
   (pipeline.bench), so their ratios (speed-up vs PyTorch = p50 ratio) hold on a noisy machine.
   Size on disk; peak RSS of load + one inference at the largest shape, per candidate in a fresh
   process (pipeline.bench.memprobe), after the timing so it cannot disturb it.
4. Report: report.json/md/html/png in `output_dir` (pipeline.report), with the gate results of
   every variant (pipeline.gate) and the release pick (pipeline.release).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field, field_validator

from pipeline.config import StrictModel, check_provider_names
from pipeline.errors import InputError, RecipeError, StageError

if TYPE_CHECKING:
    from pipeline.recipe import Recipe

CPU = "CPUExecutionProvider"
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
NOT_AVAILABLE = "not available on this machine"
# Metric names each task's score() returns (higher is better for all of them).
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "token-classification": ("f1", "precision", "recall", "token_accuracy"),
    "text-classification": ("accuracy", "macro_f1"),
    "feature-extraction": ("probe_accuracy", "cosine_mean", "cosine_min"),
    "text-generation": ("perplexity", "token_agreement"),
}
# Metrics where lower is better; metric_drop is then variant - baseline (still: positive = worse).
LOWER_IS_BETTER = ("perplexity",)
# Bulky stage metrics left out of the report (they stay in the stage manifests).
_BULKY_METRICS = ("history", "sparsity_per_layer", "recover_history")


class LatencyConfig(StrictModel):
    """How latency is measured (same process, interleaved, fixed threads)."""

    batch_sizes: list[int] = Field([1, 8], min_length=1, description="Batch sizes to time.")
    seq_lens: list[int] = Field([64], min_length=1, description="Sequence lengths to time.")
    warmup: int = Field(
        5, ge=0, description="Untimed runs of each candidate before timing (interleaved too)."
    )
    iters: int = Field(60, ge=1, description="Timed runs per candidate and shape (in turns of `block` runs).")
    threads: int = Field(2, ge=1, description="Intra-op threads for PyTorch and ONNX Runtime.")
    block: int = Field(
        20,
        ge=1,
        description="Consecutive timed runs of one candidate per turn of the round robin. Strict "
        "alternation (1) lets one runtime's still-spinning thread pool slow the next candidate: "
        "measured here, it made PyTorch eager 3x slower at batch 1 and inflated every speed-up.",
    )
    settle: int = Field(
        2,
        ge=0,
        description="Untimed runs that open every turn, absorbing the hand-over from the previous "
        "candidate's threads.",
    )

    @field_validator("batch_sizes", "seq_lens")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(v < 1 for v in value):
            raise ValueError(f"expected positive sizes, got {value}")
        if len(set(value)) != len(value):
            raise ValueError(f"expected distinct sizes, got {value}")
        return value


class ValidateConfig(StrictModel):
    """Recipe section `validate`."""

    metric: str | None = Field(
        None,
        description="Headline metric (gates, release pick, chart). Default per task: f1 (entity-level, "
        "seqeval) for token-classification, accuracy for text-classification, probe_accuracy for "
        "feature-extraction (cosine_mean to the PyTorch embeddings when the eval data has no labels).",
    )
    latency: LatencyConfig = Field(default_factory=LatencyConfig, description="Speed measurement.")
    providers: list[str] = Field(
        [CPU],
        description="ONNX Runtime execution providers to validate. CPUExecutionProvider is always "
        "validated (added when missing); others (CUDAExecutionProvider, TensorrtExecutionProvider) "
        "when present on the machine, else reported as not available.",
    )
    allow_provider_fallback: bool = Field(
        False,
        description="Accept a session that asked for a GPU provider but runs on CPU (reported, no "
        "numbers). Off: such a silent fallback fails the run.",
    )
    eval_batch_size: int = Field(32, ge=1, description="Batch size for the accuracy evaluation.")
    max_eval_examples: int | None = Field(
        None, ge=1, description="Evaluate on the first N eval examples only (reduced runs)."
    )
    measure_memory: bool = Field(
        True,
        description="Record the peak RSS of loading each candidate and one inference at the largest shape.",
    )

    @field_validator("providers")
    @classmethod
    def _check_providers(cls, value: list[str]) -> list[str]:
        check_provider_names(value)
        ordered = list(dict.fromkeys(value))
        return ordered if CPU in ordered else [CPU, *ordered]


# -- settings checks (also useful at `check` time) ---------------------------------------------------


def default_metric(task: str) -> str:
    return {
        "token-classification": "f1",
        "text-classification": "accuracy",
        "text-generation": "perplexity",
    }.get(task, "probe_accuracy")


def resolve_metric(cfg: ValidateConfig, task: str, examples: Sequence[Any]) -> str:
    """The headline metric: validate.metric, else the task's default (cosine_mean for embeddings
    whose eval data has no labels: there is no probe to train)."""
    if cfg.metric:
        return cfg.metric
    if task == "feature-extraction" and all(e.label is None for e in examples):
        return "cosine_mean"
    return default_metric(task)


def metric_drop(metric: str, baseline: float | None, variant: float | None) -> float | None:
    """Quality lost vs the baseline in the metric's units: positive = worse, whatever its direction."""
    if baseline is None or variant is None:
        return None
    drop = variant - baseline if metric in LOWER_IS_BETTER else baseline - variant
    return round(float(drop), 6)


def check_settings(recipe: Recipe) -> None:
    """Cross-section checks of validate/gates/release against the recipe; RecipeError on the first."""
    from pipeline.bench.latency import shape_key

    cfg = recipe.validate_
    task = recipe.model.task
    if task not in TASK_METRICS:
        raise RecipeError(
            f"validate: task {task!r} cannot be validated yet; supported: {', '.join(TASK_METRICS)}"
        )
    if cfg.metric is not None and cfg.metric not in TASK_METRICS[task]:
        raise RecipeError(
            f"validate.metric: {cfg.metric!r} is not a {task} metric; "
            f"expected one of {', '.join(TASK_METRICS[task])}"
        )
    measured = {shape_key(b, s) for b in cfg.latency.batch_sizes for s in cfg.latency.seq_lens}
    for key in recipe.gates.speedup_at or []:
        if key not in measured:
            raise RecipeError(
                f"gates.speedup_at: {key!r} is not a measured shape; "
                f"validate.latency gives {', '.join(sorted(measured))}"
            )
    fastest_at = getattr(recipe.release, "fastest_at", None)
    if fastest_at is not None and fastest_at not in measured:
        raise RecipeError(
            f"release.fastest_at: {fastest_at!r} is not a measured shape; validate.latency gives "
            f"{', '.join(sorted(measured))}"
        )
    if recipe.release.pick != "fastest_within_gates" and recipe.release.pick not in recipe.variants:
        raise RecipeError(
            f"release.pick: {recipe.release.pick!r} is not a variant; "
            "expected fastest_within_gates or one of "
            f"{', '.join(recipe.variants)}"
        )
    if isinstance(recipe.gates.apply_to, list):
        unknown = [n for n in recipe.gates.apply_to if n not in recipe.variants]
        if unknown:
            raise RecipeError(
                f"gates.apply_to: {', '.join(map(repr, unknown))} not a variant; "
                f"variants: {', '.join(recipe.variants)}"
            )


def primary_latency_key(recipe: Recipe) -> str:
    """The shape the chart and the release pick rank by: release.fastest_at, else the first one."""
    from pipeline.bench.latency import shape_key

    lat = recipe.validate_.latency
    return getattr(recipe.release, "fastest_at", None) or shape_key(lat.batch_sizes[0], lat.seq_lens[0])


# -- accuracy --------------------------------------------------------------------------------------


class Evaluator:
    """Runs a forward over the encoded eval set (length-sorted batches) and scores it."""

    def __init__(self, task: Any, encoded: Any, examples: Sequence[Any], id2label: Any, batch_size: int):
        self.task, self.encoded, self.examples = task, encoded, examples
        self.id2label, self.batch_size = id2label, batch_size
        self.lengths = [len(ids) for ids in encoded.features["input_ids"]]
        self.tokenizer: Any = None
        self.order = sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], i))

    @classmethod
    def for_checkpoint(
        cls, task: Any, checkpoint: Path, examples: Sequence[Any], max_length: int, batch_size: int
    ) -> Evaluator:
        """Tokenise `examples` with the checkpoint's tokenizer and labels (kept as .tokenizer)."""
        from pipeline.tasks import id2label_of, load_tokenizer

        tokenizer = load_tokenizer(checkpoint)
        encoded = task.encode(tokenizer, examples, max_length)
        id2label = id2label_of(checkpoint) if task.head_suffix else None
        evaluator = cls(task, encoded, examples, id2label, batch_size)
        evaluator.tokenizer = tokenizer
        return evaluator

    def outputs(self, forward: Callable[[dict[str, np.ndarray]], np.ndarray], label: str) -> list[np.ndarray]:
        """Per example, in the original order: its output row, per-token outputs cut to its length."""
        from tqdm import tqdm

        rows: list[np.ndarray | None] = [None] * len(self.order)
        starts = range(0, len(self.order), self.batch_size)
        for start in tqdm(starts, desc=f"eval {label}", unit="batch", disable=None, leave=False):
            indices = self.order[start : start + self.batch_size]
            out = np.asarray(forward(self.encoded.batch(indices)))
            if out.shape[0] != len(indices):
                raise StageError(
                    f"validate: {label} returned {out.shape[0]} rows for a batch of {len(indices)}"
                )
            for r, i in enumerate(indices):
                rows[i] = out[r : r + 1, : self.lengths[i]] if out.ndim >= 3 else out[r : r + 1]
        return rows  # type: ignore[return-value]

    def predict(self, forward: Callable[[dict[str, np.ndarray]], np.ndarray], label: str) -> Any:
        return self.task.predict(self.outputs(forward, label), self.encoded, self.id2label)

    def score(self, predictions: Any, reference: Any) -> dict[str, float]:
        if self.task.name == "feature-extraction":
            return self.task.score(predictions, self.examples, reference=reference)
        return self.task.score(predictions, self.examples)

    def report(self, predictions: Any) -> str:
        try:
            return self.task.report(predictions, self.examples)
        except InputError:
            return ""


def prediction_agreement(task: str, predictions: Any, reference: Any) -> float:
    """Share of predictions equal to the reference's: per word (NER), per example (classification);
    for embeddings the mean cosine to the reference embeddings."""
    if task == "feature-extraction":
        from pipeline.tasks import cosine_rows

        return float(cosine_rows(np.asarray(predictions), np.asarray(reference)).mean())
    if len(predictions) != len(reference):
        raise ValueError(f"{len(predictions)} predictions vs {len(reference)} reference predictions")
    if task == "token-classification":
        same = total = 0
        for pred, ref in zip(predictions, reference, strict=True):
            width = max(len(pred), len(ref))
            pred = list(pred) + ["O"] * (width - len(pred))
            ref = list(ref) + ["O"] * (width - len(ref))
            same += sum(p == r for p, r in zip(pred, ref, strict=True))
            total += width
        return same / total if total else 1.0
    if not len(predictions):
        return 1.0
    return float(np.mean([p == r for p, r in zip(predictions, reference, strict=True)]))


# -- providers -------------------------------------------------------------------------------------


def gpu_present() -> bool:
    """An NVIDIA GPU is visible to this process (driver loaded and a device listed)."""
    import shutil
    import subprocess

    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True
    if shutil.which("nvidia-smi"):
        try:
            listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return False
        return listed.returncode == 0 and "GPU" in listed.stdout
    return False


def provider_availability(provider: str) -> tuple[bool, str]:
    """(usable, reason) for an execution provider on this machine, without trusting the package's
    provider list alone (onnxruntime-gpu lists CUDA even where no GPU exists)."""
    import onnxruntime as ort

    if provider == CPU:
        return True, ""
    if provider not in ort.get_available_providers():
        return False, f"this onnxruntime {ort.__version__} build has no {provider}"
    if provider in GPU_PROVIDERS and not gpu_present():
        return False, "no NVIDIA GPU found"
    return True, ""


def session_options(threads: int) -> dict[str, Any]:
    """The session options validation uses (recorded in the report and the release manifest)."""
    return {
        "intra_op_num_threads": threads,
        "inter_op_num_threads": 1,
        "execution_mode": "ORT_SEQUENTIAL",
        "graph_optimization_level": "ORT_ENABLE_ALL",
    }


def make_session(path: Path, provider: str, threads: int, profile_prefix: str | None = None) -> Any:
    """An InferenceSession on `provider` (CPU as the last resort behind a GPU provider)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers = (
        [provider]
        if provider == CPU
        else (
            [provider, "CUDAExecutionProvider", CPU]
            if provider == "TensorrtExecutionProvider"
            else [provider, CPU]
        )
    )
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as err:  # ORT raises several unrelated types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: ONNX Runtime cannot load this model on {provider}: {first}") from None


def node_placement(profile_path: str) -> dict[str, Any]:
    """Nodes per execution provider (and op types per provider) from an ORT profile file."""
    try:
        events = json.loads(Path(profile_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    finally:
        Path(profile_path).unlink(missing_ok=True)
    nodes: dict[str, dict[str, str]] = {}
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") == "Node" and args.get("provider"):
            name = str(event.get("name", "")).removesuffix("_kernel_time")
            nodes.setdefault(args["provider"], {})[name] = args.get("op_name", "?")
    return {
        provider: {"nodes": len(found), "ops": dict(sorted(Counter(found.values()).items()))}
        for provider, found in sorted(nodes.items())
    }


def ort_forward(session: Any, first_only: bool = True) -> Callable[[dict[str, np.ndarray]], Any]:
    """numpy-in forward of a session: feeds the session's inputs (token_type_ids / position_ids
    filled in when the tokenizer does not give them) and returns its first output."""
    names = [i.name for i in session.get_inputs()]
    outputs = [session.get_outputs()[0].name] if first_only else None

    def feeds(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fed = {}
        ids = inputs["input_ids"]
        for name in names:
            if name in inputs:
                fed[name] = inputs[name]
            elif name == "token_type_ids":
                fed[name] = np.zeros_like(ids)
            elif name == "attention_mask":
                fed[name] = np.ones_like(ids)
            elif name == "position_ids":
                fed[name] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
            else:
                raise InputError(f"validate: model input {name!r} is not produced by the tokenizer")
        return fed

    if first_only:
        return lambda inputs: session.run(outputs, feeds(inputs))[0]
    return lambda inputs: session.run(outputs, feeds(inputs))


# -- the stage ---------------------------------------------------------------------------------------


def validate_variants(
    recipe: Recipe,
    variant_dirs: dict[str, Path],
    baseline_hf_dir: Path,
    data: Any,
    machine: dict[str, Any],
    output_dir: Path,
    stage_manifests: dict[str, list[dict[str, Any]]],
    log: logging.Logger | None = None,
) -> dict[str, Any]:
    """Validate every variant against PyTorch; write report.json/md/html/png into `output_dir`."""
    from pipeline import manifest as mf
    from pipeline.data import examples_digest
    from pipeline.report import UNSTRUCTURED_NOTE

    log = log or logging.getLogger("pipeline")
    cfg: ValidateConfig = recipe.validate_
    check_settings(recipe)
    baseline_hf_dir = Path(baseline_hf_dir)
    examples = list(data.get("eval"))
    if cfg.max_eval_examples is not None:
        examples = examples[: cfg.max_eval_examples]
    if not examples:
        raise InputError("data.eval: no examples to validate on")
    if not variant_dirs:
        raise InputError(f"validate: recipe {recipe.name!r} has no variant artifacts to validate")

    if recipe.model.task == "text-generation":
        part = _decoder_part(recipe, variant_dirs, baseline_hf_dir, examples, log)
    else:
        part = _encoder_part(recipe, variant_dirs, baseline_hf_dir, examples, log)
    for name, entry in part["variants"].items():
        entry["size_bytes"] = sum(
            p.stat().st_size for p in Path(variant_dirs[name]).glob("model.onnx*") if p.is_file()
        )
        facts = _stage_facts(stage_manifests.get(name, []), UNSTRUCTURED_NOTE)
        entry["notes"] = entry.get("notes", []) + facts.pop("notes")
        entry.update(facts)
    loads = part.pop("load_average_1m")
    report: dict[str, Any] = {
        "format_version": 1,
        "recipe": recipe.name,
        "description": recipe.description,
        "task": recipe.model.task,
        "metric_name": part["metric_name"],
        "metric_higher_is_better": part["metric_name"] not in LOWER_IS_BETTER,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "versions": mf.versions(),
        "settings": {
            "eval_examples": len(examples),
            "eval_data_sha256": examples_digest(examples),
            "eval_batch_size": cfg.eval_batch_size,
            "latency": cfg.latency.model_dump(mode="json"),
            "primary_latency_key": primary_latency_key(recipe),
            "providers": list(cfg.providers),
            "allow_provider_fallback": cfg.allow_provider_fallback,
            "session_options": session_options(cfg.latency.threads),
            "load_average_1m": loads,
            **part["settings"],
        },
        "providers": part["providers"],
        "baseline": part["baseline"],
        "variants": part["variants"],
        "notes": part["notes"] + _load_notes(*loads.values(), machine.get("cores") or os.cpu_count() or 1),
    }
    return finalize_report(recipe, report, Path(output_dir), log)


def finalize_report(
    recipe: Recipe, report: dict[str, Any], output_dir: Path, log: logging.Logger | None = None
) -> dict[str, Any]:
    """(Re)compute the decisions from the measured figures with the recipe's current gates and
    release settings (gate results of every variant, Pareto front, release pick) and write
    report.json/md/html/png. The runner can call this on a cached report when only `gates` or
    `release` changed: nothing is re-measured."""
    from pipeline.gate import evaluate_variant
    from pipeline.release import pick_release
    from pipeline.report import chart_points, pareto_front, write_report

    log = log or logging.getLogger("pipeline")
    report["settings"]["primary_latency_key"] = primary_latency_key(recipe)
    report["gates"] = {
        r.name: r.as_report()
        for name in report["variants"]
        for r in evaluate_variant(recipe.gates, report, name)
    }
    report["pareto"] = pareto_front(chart_points(report), report.get("metric_higher_is_better", True))
    report["release"] = pick_release(recipe, report)
    log.info("validate: release %s (%s)", report["release"]["variant"], report["release"]["reason"])
    write_report(report, Path(output_dir))
    return report


def _encoder_part(
    recipe: Recipe, variant_dirs: dict[str, Path], baseline_hf_dir: Path, examples: list[Any], log: Any
) -> dict[str, Any]:
    """Encoder tasks: eval with the task helpers, providers, interleaved timing, memory probes."""
    import onnxruntime  # noqa: F401  (loaded before anything is timed)
    import torch
    from tqdm import tqdm

    from pipeline.bench import interleaved, shape_key, speedups, summarize, torch_threads
    from pipeline.bench.memprobe import measure_peak_memory
    from pipeline.decoder.tiny import random_weights
    from pipeline.onnx_utils import dummy_inputs, model_file
    from pipeline.tasks import get_task

    cfg: ValidateConfig = recipe.validate_
    lat: LatencyConfig = cfg.latency
    task = get_task(recipe.model.task)
    evaluator = Evaluator.for_checkpoint(
        task, baseline_hf_dir, examples, recipe.model.max_length, cfg.eval_batch_size
    )
    tokenizer = evaluator.tokenizer
    hf_config = json.loads((baseline_hf_dir / "config.json").read_text(encoding="utf-8"))
    vocab_size = int(hf_config.get("vocab_size") or tokenizer.vocab_size)
    max_positions = hf_config.get("max_position_embeddings")
    if max_positions and max(lat.seq_lens) > max_positions:
        raise RecipeError(
            f"validate.latency.seq_lens: {max(lat.seq_lens)} exceeds the model's "
            f"max_position_embeddings {max_positions}"
        )
    random_model = random_weights(baseline_hf_dir)
    metric_name = resolve_metric(cfg, task.name, examples)
    shapes = [(b, s) for b in lat.batch_sizes for s in lat.seq_lens]
    biggest = (max(lat.batch_sizes), max(lat.seq_lens))
    torch_names = list(tokenizer.model_input_names)

    candidates: dict[str, tuple[Callable[..., Any], list[str]]] = {}  # name -> (forward, input names)
    with torch_threads(lat.threads):
        # -- PyTorch baseline --------------------------------------------------------------------
        log.info(
            "validate: PyTorch eager fp32 baseline %s on %d eval examples", baseline_hf_dir, len(examples)
        )
        model = task.load_model(baseline_hf_dir)
        torch_fn = task.torch_forward(model)
        base_pred = evaluator.predict(torch_fn, "pytorch")
        base_metrics = evaluator.score(base_pred, reference=base_pred)
        if metric_name not in base_metrics:
            raise InputError(
                f"validate.metric: {metric_name!r} not computed for this eval data "
                f"(got {', '.join(base_metrics)})"
            )
        baseline: dict[str, Any] = {
            "name": "pytorch-eager-fp32",
            "checkpoint": str(baseline_hf_dir),
            "metric": base_metrics[metric_name],
            "metrics": base_metrics,
            "classification_report": evaluator.report(base_pred),
            "size_bytes": sum(
                p.stat().st_size for p in baseline_hf_dir.iterdir() if p.suffix in (".safetensors", ".bin")
            ),
            "peak_rss_bytes": None,
            "torch_version": torch.__version__,
        }
        candidates["pytorch"] = (torch_fn, torch_names)
        log.info("validate: PyTorch %s = %.4f", metric_name, baseline["metric"])

        # -- ONNX variants -----------------------------------------------------------------------
        availability = {p: provider_availability(p) for p in cfg.providers}
        variants: dict[str, dict[str, Any]] = {}
        labels: dict[tuple[str, str], str] = {}  # (variant, provider) -> candidate label
        with tempfile.TemporaryDirectory(prefix="validate-profile-") as profiles:
            for name, folder in variant_dirs.items():
                path = model_file(Path(folder))
                entry: dict[str, Any] = {"artifact": str(folder), "providers": {}}
                for provider in cfg.providers:
                    usable, reason = availability[provider]
                    if not usable:
                        entry["providers"][provider] = {"status": NOT_AVAILABLE, "reason": reason}
                        continue
                    session = make_session(path, provider, lat.threads, str(Path(profiles) / "p"))
                    actual = list(session.get_providers())
                    forward = ort_forward(session)
                    forward(dummy_inputs([i.name for i in session.get_inputs()], *biggest, vocab_size))
                    placement = node_placement(session.end_profiling())
                    result: dict[str, Any] = {"session_providers": actual, "node_placement": placement}
                    if actual[0] != provider:
                        message = (
                            f"validate: variant {name}: asked for {provider} "
                            f"but the session runs on {actual[0]} (silent fallback)"
                        )
                        if not cfg.allow_provider_fallback:
                            raise StageError(
                                message + "; set validate.allow_provider_fallback: true to accept it"
                            )
                        log.warning("%s; no numbers reported for it", message)
                        entry["providers"][provider] = {**result, "status": f"fell back to {actual[0]}"}
                        continue
                    label = (
                        name if provider == CPU else f"{name}@{provider.removesuffix('ExecutionProvider')}"
                    )
                    predictions = evaluator.predict(forward, label)
                    metrics = evaluator.score(predictions, reference=base_pred)
                    result.update(
                        {
                            "status": "ok",
                            "metric": metrics.get(metric_name),
                            "metrics": metrics,
                            "agreement": round(prediction_agreement(task.name, predictions, base_pred), 6),
                            "peak_rss_bytes": None,
                        }
                    )
                    if provider == CPU:
                        result["classification_report"] = evaluator.report(predictions)
                    entry["providers"][provider] = result
                    candidates[label] = (
                        ort_forward(session, first_only=False),
                        [i.name for i in session.get_inputs()],
                    )
                    labels[(name, provider)] = label
                    log.info(
                        "validate: %s %s = %.4f (agreement %.4f)",
                        label,
                        metric_name,
                        result["metric"],
                        result["agreement"],
                    )
                variants[name] = entry

        # -- speed: interleaved, one shape at a time ---------------------------------------------
        timings: dict[str, dict[str, dict[str, Any]]] = {label: {} for label in candidates}
        load_before = _load_average()
        total = len(shapes) * len(candidates) * lat.iters
        with tqdm(total=total, desc="benchmark", unit="run", disable=None, leave=False) as bar:
            for batch, seq in shapes:
                calls = {}
                for label, (fn, names) in candidates.items():
                    inputs = dummy_inputs(names, batch, seq, vocab_size, seed=0)
                    calls[label] = lambda fn=fn, inputs=inputs: fn(inputs)
                times = interleaved(
                    calls,
                    warmup=lat.warmup,
                    iters=lat.iters,
                    block=lat.block,
                    settle=lat.settle,
                    progress=bar,
                )
                for label, ms in times.items():
                    timings[label][shape_key(batch, seq)] = summarize(ms, batch)
                log.info(
                    "validate: b%d s%d p50 ms: %s",
                    batch,
                    seq,
                    ", ".join(f"{k} {timings[k][shape_key(batch, seq)]['p50_ms']:.2f}" for k in candidates),
                )
        load_after = _load_average()
        candidates.clear()  # free the runtimes before the memory probes
        del model, torch_fn

    # -- peak memory: each candidate in a fresh process (in-process numbers reuse freed memory) ------
    if cfg.measure_memory:
        probes = [("torch", baseline_hf_dir, CPU, baseline)]
        for (name, provider), _label in labels.items():
            probes.append(
                (
                    "onnx",
                    model_file(Path(variant_dirs[name])),
                    provider,
                    variants[name]["providers"][provider],
                )
            )
        for kind, path, provider, target in tqdm(probes, desc="peak memory", disable=None, leave=False):
            try:
                probe = measure_peak_memory(
                    kind,
                    path,
                    batch=biggest[0],
                    seq=biggest[1],
                    threads=lat.threads,
                    vocab_size=vocab_size,
                    provider=provider,
                    task=task.name,
                )
            except (RuntimeError, OSError) as err:
                raise StageError(f"validate: {err}") from None
            target["peak_rss_bytes"] = probe["delta_bytes"]

    baseline["latency"] = timings["pytorch"]
    for (name, provider), label in labels.items():
        result = variants[name]["providers"][provider]
        result["latency"] = timings[label]
        result["speedup_vs_pytorch"] = speedups(baseline["latency"], timings[label])
    for entry in variants.values():
        cpu = entry["providers"][CPU]
        entry.update(
            {
                "metric": cpu["metric"],
                "metrics": cpu["metrics"],
                "metric_drop": metric_drop(metric_name, baseline["metric"], cpu["metric"]),
                "agreement": cpu["agreement"],
                "classification_report": cpu.pop("classification_report", ""),
                "latency": cpu["latency"],
                "speedup_vs_pytorch": cpu["speedup_vs_pytorch"],
                "peak_rss_bytes": cpu.get("peak_rss_bytes"),
            }
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
            "memory_method": (
                "peak RSS growth while loading + one inference at the largest shape "
                f"(b{biggest[0]} s{biggest[1]}), each candidate in a fresh process"
                if cfg.measure_memory
                else "not measured (validate.measure_memory: false)"
            ),
        },
        "notes": (
            [
                "random weights (config.json pipeline_random_weights): the metric measures the "
                "variants' fidelity to the fp32 model, not a task skill; only the speed figures transfer"
            ]
            if random_model
            else []
        ),
        "load_average_1m": {"before_timing": load_before, "after_timing": load_after},
    }


def _decoder_part(
    recipe: Recipe, variant_dirs: dict[str, Path], baseline_hf_dir: Path, examples: list[Any], log: Any
) -> dict[str, Any]:
    """text-generation: perplexity on the eval texts, greedy-token agreement, per-token decode
    latency at each context length (batch 1), via pipeline.decoder.validate_decoder (CPU)."""
    from pipeline.bench import shape_key
    from pipeline.decoder.validate import validate_decoder

    cfg: ValidateConfig = recipe.validate_
    lat: LatencyConfig = cfg.latency
    metric_name = cfg.metric or "perplexity"
    texts = [e.text for e in examples]
    log.info(
        "validate: decoder %s, %d eval texts, perplexity and greedy agreement", baseline_hf_dir, len(texts)
    )
    load_before = _load_average()
    result = validate_decoder(
        baseline_hf_dir,
        {name: Path(folder) for name, folder in variant_dirs.items()},
        texts,
        context_lens=lat.seq_lens,
        warmup=lat.warmup,
        iters=lat.iters,
        threads=lat.threads,
        trust_remote_code=recipe.model.trust_remote_code,
    )
    load_after = _load_average()
    speed = result.get("speed") or {}
    runs = speed.get("results") or {}
    ratios = speed.get("speedup_vs_pytorch") or {}

    def latency(name: str) -> dict[str, Any]:
        return {
            shape_key(1, int(length)): {
                "p50_ms": round(r["decode_ms_p50"], 4),
                "p90_ms": round(r["decode_ms_p90"], 4),
                "p99_ms": None,  # the decoder timing records p50/p90 only
                "throughput_per_s": round(r["decode_tokens_per_s"], 3),
                "prefill_ms_p50": round(r["prefill_ms_p50"], 4),
                "prompt_tokens_per_s": round(r["prompt_tokens_per_s"], 3),
            }
            for length, r in (runs.get(name) or {}).items()
        }

    def pick(metrics: dict[str, Any]) -> float | None:
        return metrics.get(metric_name)

    base_metrics = {"perplexity": result["pytorch"]["perplexity"], "token_agreement": 1.0}
    baseline = {
        "name": "pytorch-eager-fp32",
        "checkpoint": str(baseline_hf_dir),
        "metric": pick(base_metrics),
        "metrics": base_metrics,
        "latency": latency("pytorch"),
        "size_bytes": sum(
            p.stat().st_size for p in baseline_hf_dir.iterdir() if p.suffix in (".safetensors", ".bin")
        ),
        "peak_rss_bytes": None,
    }
    variants: dict[str, Any] = {}
    for name, scored in result["variants"].items():
        greedy = scored.get("greedy") or {}
        metrics = {
            "perplexity": scored["perplexity"],
            "perplexity_ratio": scored.get("perplexity_ratio"),
            "token_agreement": greedy.get("token_agreement"),
            "exact_sequences": greedy.get("exact_sequences"),
        }
        decode = {key: round(v["decode"], 4) for key, v in ((ratios.get(name) or {}).items())}
        prefill = {key: round(v["prefill"], 4) for key, v in ((ratios.get(name) or {}).items())}
        variants[name] = {
            "artifact": str(variant_dirs[name]),
            "metric": pick(metrics),
            "metrics": metrics,
            "metric_drop": metric_drop(metric_name, baseline["metric"], pick(metrics)),
            "agreement": greedy.get("token_agreement"),
            "latency": latency(name),
            "speedup_vs_pytorch": {shape_key(1, int(k)): v for k, v in decode.items()},
            "prefill_speedup_vs_pytorch": {shape_key(1, int(k)): v for k, v in prefill.items()},
            "peak_rss_bytes": None,
            "providers": {
                p: (
                    {"status": "ok", "session_providers": [CPU]}
                    if p == CPU
                    else {"status": "not validated", "reason": "decoder validation runs on CPU only"}
                )
                for p in cfg.providers
            },
        }
    notes = []
    if result.get("random_weights"):
        notes.append(
            "random weights (config.json pipeline_random_weights): perplexity and agreement measure the "
            "export, not a language model"
        )
    if lat.batch_sizes != [1]:
        notes.append(
            "decoders are timed at batch 1 only (per-token decode latency after a past of seq tokens)"
        )
    return {
        "metric_name": metric_name,
        "baseline": baseline,
        "variants": variants,
        "providers": {
            p: ("used" if p == CPU else "not validated for decoders (CPU only)") for p in cfg.providers
        },
        "settings": {
            "memory_method": "not measured for decoders",
            "latency_meaning": "decoder: p50/p90 ms of one decode step after a past of seq tokens; "
            "throughput = decode tokens/s; prefill_ms_p50 = the seq-token prompt",
            "decoder_text": result.get("text"),
            "random_weights": bool(result.get("random_weights")),
        },
        "notes": notes,
        "load_average_1m": {"before_timing": load_before, "after_timing": load_after},
    }


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _load_notes(before: float | None, after: float | None, cores: int) -> list[str]:
    """A warning in the report when other work competed for the CPU during timing."""
    busiest = max((v for v in (before, after) if v is not None), default=None)
    if busiest is None or busiest <= cores * 1.25:
        return []
    return [
        f"the machine was busy while timing (1-minute load average up to {busiest:.1f} on {cores} cores): "
        "absolute times are unreliable and multi-threaded runtimes lose most to preemption, so even the "
        "interleaved ratios may be skewed; re-run on a quiet machine for numbers to quote"
    ]


def _stage_facts(manifests: list[dict[str, Any]], unstructured_note: str) -> dict[str, Any]:
    """Per variant from its stage manifests: the stage list, attention fusion, sparsity notes."""
    stages, notes = [], []
    fusion, sparsity = None, None
    for manifest in manifests:
        metrics = manifest.get("metrics") or {}
        stage = manifest.get("stage")
        stages.append(
            {
                "stage": stage,
                "config": manifest.get("config"),
                "cache_key": manifest.get("cache_key"),
                "data": manifest.get("data") or {},
                "metrics": {k: v for k, v in metrics.items() if k not in _BULKY_METRICS},
            }
        )
        if stage == "optimize":
            expected = (metrics.get("expected_fusion") or {}).get("Attention")
            fusion = {
                "fused": metrics.get("attention_fused"),
                "expected": expected,
                "complete": metrics.get("attention_fusion_complete"),
            }
        if (
            stage == "prune"
            and (metrics.get("kind") or (manifest.get("config") or {}).get("kind")) == "unstructured"
        ):
            sparsity = {"kind": "unstructured", "sparsity": metrics.get("sparsity")}
            share = (
                f" (sparsity {metrics['sparsity']:.0%})" if isinstance(metrics.get("sparsity"), float) else ""
            )
            notes.append(unstructured_note + share)
    return {"stages": stages, "attention_fusion": fusion, "sparsity": sparsity, "notes": notes}
