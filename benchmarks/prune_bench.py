"""Benchmark: what magnitude pruning buys on the default recipe's real model (not a test).

    .venv/bin/python benchmarks/prune_bench.py [--recipe recipes/minilm-ner-wnut16.yaml]
        [--work-dir exported/_bench/prune] [--no-finetune] [--recover-epochs 2] [--iters 100]

Model: the packaged all-MiniLM-L6-v2 fine-tuned on WNUT-16 with the recipe's finetune settings
(cached in the work dir; `--no-finetune` uses the bare encoder as feature-extraction, without a
task metric). Variants, each pruned by the real prune stage and exported with optimum (opset 18),
proven equal to PyTorch on the recipe's parity shapes, then quantized with dynamic INT8
(quantize_dynamic, per-channel):

    dense          the fine-tuned model
    unstr50        unstructured 50% (global L1; no recovery): same shapes, so no speed-up
    ffn50          FFN neurons 1536 -> 768 per layer, recovered (distilled from dense)
    heads50        6 of 12 heads per layer dropped, recovered (distilled from dense)

Printed per variant and precision: parameter count, ONNX file size, gzip size, Attention ops after
ORT fusion (with the pruned head count), entity F1 (ONNX Runtime, eval split), ORT latency p50 at
batch 1 and 8 (seq 64, 2 threads, all models timed interleaved in one process), and for the pruned
variants the PyTorch F1 right after pruning and after recovery.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "dense": None,
    "unstr50": {"kind": "unstructured", "amount": 0.5},
    "ffn50": {"kind": "ffn", "amount": 0.5},
    "heads50": {"kind": "heads", "amount": 0.5},
}
DEFAULT_VARIANTS = ",".join(VARIANTS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "minilm-ner-wnut16.yaml"))
    parser.add_argument("--work-dir", default=str(ROOT / "exported" / "_bench" / "prune"))
    parser.add_argument("--no-finetune", action="store_true", help="bare encoder, feature-extraction")
    parser.add_argument("--recover-epochs", type=int, default=2)
    parser.add_argument("--no-distill", action="store_true", help="recover without distillation")
    parser.add_argument("--iters", type=int, default=100, help="timed runs per model and batch size")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument(
        "--variants", default=DEFAULT_VARIANTS, help=f"comma-separated subset of {', '.join(VARIANTS)}"
    )
    return parser.parse_args(argv)


def finetuned_model(recipe, bundle, work: Path, log: logging.Logger) -> Path:
    """The recipe's source model fine-tuned with its finetune settings (cached in `work`)."""
    from pipeline.sources import resolve_model_source
    from pipeline.stages.finetune import train_model
    from pipeline.tasks import get_task, load_tokenizer

    folder = work / "finetuned"
    if (folder / "model.safetensors").is_file():
        log.info("using the cached fine-tuned model in %s", folder)
        return folder
    import torch

    source = resolve_model_source(recipe.model.source)
    task = get_task(recipe.model.task)
    torch.manual_seed(recipe.finetune.seed)
    model = task.load_model(source, labels=bundle.labels())
    tokenizer = load_tokenizer(source)
    started = time.perf_counter()
    result = train_model(
        model, tokenizer, task, bundle.get("train"), bundle.get("eval"), recipe.finetune,
        recipe.model.max_length, log=log,
    )  # fmt: skip
    log.info(
        "fine-tuned in %.0f s: %s %.4f", time.perf_counter() - started, result.metric_name, result.best_metric
    )
    tmp = work / "finetuned.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "finetune_metrics.json").write_text(json.dumps(result.metrics(), indent=1))
    tmp.rename(folder)
    return folder


def prune_variant(name, raw, recipe, bundle, dense: Path, work: Path, args, log) -> tuple[Path, dict]:
    """Run the real prune stage for one variant (cached by its config in `work`)."""
    from pipeline.registry import StageContext, get_stage
    from pipeline.stages.prune import PruneConfig

    config = dict(raw)
    if config["kind"] != "unstructured" and not args.no_finetune and args.recover_epochs:
        config.update(recover_epochs=args.recover_epochs, distill=not args.no_distill)
    tag = "-".join(f"{k}={v}" for k, v in sorted(config.items()))
    folder = work / f"{name}__{tag}"
    if (folder / "metrics.json").is_file():
        return folder, json.loads((folder / "metrics.json").read_text())
    tmp = work / f"{name}.tmp"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    ctx = StageContext(
        config=PruneConfig.model_validate(config), recipe=recipe, input_dir=dense, output_dir=tmp,
        data=bundle, machine={}, log=log, reference_hf_dir=dense,
    )  # fmt: skip
    metrics = get_stage("prune").fn(ctx)
    metrics["config"] = config
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
    tmp.rename(folder)
    return folder, metrics


def export(folder: Path, out: Path, task: str, opset: int) -> Path:
    from optimum.exporters.onnx import main_export

    if not (out / "model.onnx").is_file():
        main_export(
            str(folder), output=out, task=task, opset=opset, do_validation=False, library_name="transformers"
        )
    return out / "model.onnx"


def quantize(fp32: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = fp32.with_name("model_int8.onnx")
    if not out.is_file():
        quantize_dynamic(str(fp32), str(out), per_channel=True, weight_type=QuantType.QInt8)
    return out


def attention_fused(onnx_path: Path, config) -> int:
    from onnxruntime.transformers.optimizer import optimize_model

    from pipeline.pruning.structured import attention_shape

    heads, hidden = attention_shape(config)
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    stats = optimize_model(str(onnx_path), model_type="bert", num_heads=heads, hidden_size=hidden)
    return int(stats.get_fused_operator_statistics().get("Attention", 0))


def onnx_metric(session, task, tokenizer, examples, max_length, id2label) -> float | None:
    if task.head_suffix is None:
        return None
    encoded = task.encode(tokenizer, examples, max_length)
    names = {i.name for i in session.get_inputs()}

    def forward(inputs):
        return session.run(None, {k: v for k, v in inputs.items() if k in names})[0]

    return float(task.score(task.run(forward, encoded, 64, id2label), examples)[task.metric_name])


def interleaved_latency(sessions: dict, batch: int, seq: int, vocab: int, warmup: int, iters: int) -> dict:
    """p50/p90 ms per session, timing one run of each session in turn (rotating start)."""
    from pipeline.onnx_utils import dummy_inputs

    feeds = {
        name: dummy_inputs([i.name for i in s.get_inputs()], batch, seq, vocab, seed=0)
        for name, s in sessions.items()
    }
    names = list(sessions)
    for name in names:
        for _ in range(warmup):
            sessions[name].run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for it in range(iters):
        shift = it % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            sessions[name].run(None, feeds[name])
            times[name].append((time.perf_counter() - started) * 1000)
    return {
        name: {"p50": statistics.median(t), "p90": statistics.quantiles(t, n=10)[-1]}
        for name, t in times.items()
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Only this script's and the pipeline's progress at INFO; libraries (ORT's optimizer logs a
    # harmless "Input hidden size (192) is not same as ... (384)" for head-pruned models) at ERROR.
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("prune_bench")
    for mine in ("prune_bench", "pipeline"):
        logging.getLogger(mine).setLevel(logging.INFO)
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from pipeline.data import DataBundle
    from pipeline.fingerprint import machine_fingerprint
    from pipeline.models import load_torch_model
    from pipeline.onnx_utils import open_session, parity_grid
    from pipeline.pruning.metrics import count_parameters, gzip_bytes
    from pipeline.recipe import load_recipe
    from pipeline.sources import resolve_model_source
    from pipeline.tasks import get_task, id2label_of, load_tokenizer

    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    work = Path(args.work_dir) / ("encoder" if args.no_finetune else "finetuned")
    work.mkdir(parents=True, exist_ok=True)
    if args.no_finetune:
        recipe = recipe.model_copy(
            update={"model": recipe.model.model_copy(update={"task": "feature-extraction"})}
        )
        dense = resolve_model_source(recipe.model.source)
        log.info("no fine-tuning: bare encoder %s, feature-extraction, no task metric", dense)
    bundle = DataBundle(recipe)
    if not args.no_finetune:
        dense = finetuned_model(recipe, bundle, work, log)
    task_name = recipe.model.task
    task = get_task(task_name)
    tokenizer = load_tokenizer(dense)
    eval_examples = bundle.get("eval") if task.head_suffix is not None else []

    rows: dict[str, dict] = {}
    sessions: dict[str, object] = {}
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in chosen:
        raw = VARIANTS[name]
        started = time.perf_counter()
        if raw is None:
            folder, metrics = dense, {}
        else:
            folder, metrics = prune_variant(name, raw, recipe, bundle, dense, work, args, log)
        model = load_torch_model(folder, task_name)
        fp32 = export(folder, work / f"{name}_onnx", task_name, recipe.export.opset)
        parity = parity_grid(
            lambda inputs, m=model: [
                m(**{k: torch.from_numpy(v) for k, v in inputs.items()})[0].detach().numpy()
            ],
            open_session(fp32),
            recipe.export.parity.shapes,
            recipe.export.parity.atol,
            model.config.vocab_size,
            label=f"{name} export",
        )
        int8 = quantize(fp32)
        id2label = id2label_of(model.config) if task.head_suffix is not None else None
        for precision, path in (("fp32", fp32), ("int8", int8)):
            session = open_session(path, threads=args.threads)
            key = f"{name}/{precision}"
            sessions[key] = session
            rows[key] = {
                "params": count_parameters(model),
                "onnx_mb": sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 1e6,
                "gzip_mb": gzip_bytes(path, path.with_name(path.name + ".data")) / 1e6,
                "f1_onnx": onnx_metric(
                    session, task, tokenizer, eval_examples, recipe.model.max_length, id2label
                ),
                "attention": attention_fused(fp32, model.config) if precision == "fp32" else None,
                "parity": parity["max_abs_diff"] if precision == "fp32" else None,
                "f1_dense": metrics.get("metric_dense"),
                "f1_pruned": metrics.get("metric_pruned"),
                "f1_recovered": metrics.get("metric_recovered"),
                "sparsity": metrics.get("sparsity"),
            }
        log.info("%s ready in %.0f s", name, time.perf_counter() - started)

    vocab = load_torch_model(dense, task_name).config.vocab_size
    for batch in (1, 8):
        latency = interleaved_latency(sessions, batch, args.seq, vocab, args.warmup, args.iters)
        for key, value in latency.items():
            rows[key][f"b{batch}_p50"] = value["p50"]
            rows[key][f"b{batch}_p90"] = value["p90"]

    fingerprint = machine_fingerprint()
    print()
    what = "bare encoder" if args.no_finetune else "fine-tuned on the recipe train split"
    print(f"model: {dense} ({what})")
    print(
        f"machine: {fingerprint.get('cpu_model')} cores={fingerprint.get('cores')} "
        f"ort={fingerprint.get('ort_version')}; ORT {args.threads} threads, seq {args.seq}, "
        f"{args.iters} interleaved iters, p50 ms"
    )
    base = rows.get("dense/fp32") or next(iter(rows.values()))
    base1, base8 = base["b1_p50"], base["b8_p50"]
    header = (
        f"{'variant':<14}{'params':>11}{'onnx MB':>9}{'gzip MB':>9}{'Attn':>5}{'F1 ort':>8}"
        f"{'b1 p50':>8}{'x dense':>8}{'b8 p50':>8}{'x dense':>8}  F1 torch pruned -> recovered"
    )
    print(header)
    print("-" * len(header))
    for key, r in rows.items():
        f1 = "-" if r["f1_onnx"] is None else f"{r['f1_onnx']:.4f}"
        attn = "-" if r["attention"] is None else str(r["attention"])
        recov = ""
        if r["f1_pruned"] is not None:
            recov = f"  {r['f1_pruned']:.4f} -> {r['f1_recovered']:.4f} (dense {r['f1_dense']:.4f})"
        if r["sparsity"] is not None:
            recov += f"  sparsity {r['sparsity']:.3f}"
        print(
            f"{key:<14}{r['params']:>11,}{r['onnx_mb']:>9.2f}{r['gzip_mb']:>9.2f}{attn:>5}{f1:>8}"
            f"{r['b1_p50']:>8.2f}{base1 / r['b1_p50']:>7.2f}x"
            f"{r['b8_p50']:>8.2f}{base8 / r['b8_p50']:>7.2f}x{recov}"
        )
    print(
        "parity (fp32 export vs pruned PyTorch, max |diff|): "
        + ", ".join(
            f"{k.split('/')[0]} {r['parity']:.2e}" for k, r in rows.items() if r["parity"] is not None
        )
    )
    print("note: unstructured zeros stay dense in ONNX: no ORT speed-up, same file size; only gzip shrinks.")
    (work / "results.json").write_text(
        json.dumps({"rows": rows, "machine": fingerprint}, indent=1, default=str)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
