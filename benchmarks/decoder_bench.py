"""Decoder speed benchmark: fp32, INT8 and INT4 ONNX vs PyTorch eager, prompt tokens/s and decode latency.

    .venv/bin/python benchmarks/decoder_bench.py                       # GPT-2 small shape, random weights
    .venv/bin/python benchmarks/decoder_bench.py --model-dir path/to/gpt2   # real weights (a local folder)
    .venv/bin/python benchmarks/decoder_bench.py --lm-head-study           # also: LM head / embedding INT4

Without --model-dir a GPT-2 small (GPT2Config defaults: 12 layers, hidden 768, vocab 50,257, 124M
parameters) is built from its config with RANDOM weights (said in the output); no network needed.
The model is exported with its KV cache (pipeline.decoder.export_decoder, parity checked), quantized
to dynamic INT8 and weight-only INT4 (MatMulNBits RTN, block 32, with and without accuracy_level 4
= int8 activations), the LM head and the embedding kept fp32 (the measured default), then every
variant and PyTorch eager fp32 are timed in one process, interleaved, with 2 threads, at batch 1:
prefill of the context (prompt tokens/s) and one decode step after a past of that length (p50/p90
ms). Quality vs fp32 ONNX is measured on the same token ids: next-token KL divergence, top-1
agreement, and the largest logit difference. --lm-head-study adds INT8 and INT4 with the LM head
quantized, and INT4 with the embedding quantized too. --reuse keeps the artifacts already in --work.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_random_gpt2(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.decoder.tiny import RANDOM_WEIGHTS_KEY

    config = GPT2Config()
    setattr(config, RANDOM_WEIGHTS_KEY, True)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).eval().save_pretrained(folder, safe_serialization=True)
    return folder


def distortion(reference: Any, session: Any, ids: np.ndarray) -> dict[str, float]:
    """Next-token KL(fp32 || variant), top-1 agreement and max |logit diff| on one window of `ids`."""
    from pipeline.decoder.perplexity import log_softmax, onnx_logits_fn

    ref = onnx_logits_fn(reference)(ids[None, :])[0]
    out = onnx_logits_fn(session)(ids[None, :])[0]
    log_p, log_q = log_softmax(ref), log_softmax(out)
    kl = float((np.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean())
    return {
        "kl_vs_fp32": kl,
        "top1_agreement_vs_fp32": float((ref.argmax(-1) == out.argmax(-1)).mean()),
        "max_abs_logit_diff": float(np.abs(ref.astype(np.float64) - out).max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="HF causal-LM folder (default: random GPT-2 small)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument(
        "--lm-head-study", action="store_true", help="also quantize the LM head (and the embedding)"
    )
    parser.add_argument("--reuse", action="store_true", help="reuse the artifacts already in --work")
    parser.add_argument("--json", type=Path, help="write all results here")
    args = parser.parse_args(argv)

    import torch

    from pipeline.decoder.export import export_decoder
    from pipeline.decoder.quantize import quantize_decoder
    from pipeline.decoder.speed import OnnxBackend, TorchBackend, decode_speed, format_table
    from pipeline.decoder.tiny import random_weights
    from pipeline.fingerprint import machine_fingerprint
    from pipeline.models import load_torch_model
    from pipeline.onnx_utils import open_session

    torch.set_num_threads(args.threads)
    scratch = tempfile.TemporaryDirectory(prefix="decoder-bench-") if args.work is None else None
    work = Path(scratch.name) if scratch else args.work
    work.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    log: dict[str, Any] = {}

    hf_dir = work / "hf"
    if args.model_dir:
        model_dir = args.model_dir
    elif args.reuse and (hf_dir / "config.json").is_file():
        model_dir = hf_dir
    else:
        model_dir = build_random_gpt2(hf_dir)
    model = load_torch_model(model_dir, "text-generation")
    params = sum(p.numel() for p in model.parameters())
    is_random = random_weights(model_dir)
    print(f"model: {model.config.model_type}, {params / 1e6:.1f}M parameters, random_weights: {is_random}")
    parity = {"atol": 1e-3, "batch_size": 1, "prompt_lens": [1, 16], "past_lens": [16]}
    started = time.perf_counter()
    export_file = work / "fp32" / "export.json"
    if args.reuse and export_file.is_file():
        export = json.loads(export_file.read_text())
    else:
        export = export_decoder(model_dir, work / "fp32", 18, parity)
        export_file.write_text(json.dumps(export))
    log["export"] = {
        k: export[k] for k in ("parity", "model_bytes", "gemm_rewritten_as_matmul", "lm_head_tied")
    }
    print(
        f"export: {time.perf_counter() - started:.0f} s, parity max |diff| "
        f"logits {export['parity']['max_abs_diff_logits']:.2e}, "
        f"present {export['parity']['max_abs_diff_present']:.2e}"
    )

    int4 = {"mode": "int4", "block_size": args.block_size}
    plans: dict[str, dict[str, Any]] = {
        "int8": {"mode": "int8"},
        "int4": dict(int4),
        "int4-acc4": {**int4, "accuracy_level": 4},
    }
    if args.lm_head_study:
        plans["int8-head-q"] = {"mode": "int8", "quantize_lm_head": True}
        plans["int4-head-q"] = {**int4, "quantize_lm_head": True}
        plans["int4-head-emb-q"] = {**int4, "quantize_lm_head": True, "quantize_embedding": True}
    quant: dict[str, Any] = {}
    for name, plan in plans.items():
        started = time.perf_counter()
        metrics_file = work / name / "quantize.json"
        if args.reuse and metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
        else:
            grid = {"prompt_lens": [8], "past_lens": [8]}
            metrics = quantize_decoder(work / "fp32", work / name, parity=grid, **plan)
            metrics_file.write_text(json.dumps(metrics))
        quant[name] = {
            "size_mb": metrics["size_bytes"] / 1e6,
            "ops": {k: v for k, v in metrics["quantized_ops"].items() if v},
            "settings": metrics["settings"],
            "lm_head": metrics["lm_head"],
        }
        took = time.perf_counter() - started
        print(f"quantize {name}: {took:.0f} s, {metrics['size_bytes'] / 1e6:.0f} MB")

    sessions = {"fp32": open_session(work / "fp32" / "model.onnx", threads=args.threads)}
    sessions.update({n: open_session(work / n / "model.onnx", threads=args.threads) for n in plans})
    rng = np.random.default_rng(1)
    ids = rng.integers(3, model.config.vocab_size, size=256, dtype=np.int64)
    for name in plans:
        quant[name].update(distortion(sessions["fp32"], sessions[name], ids))

    backends: dict[str, Any] = {"pytorch": TorchBackend(model)}
    backends.update({name: OnnxBackend(session) for name, session in sessions.items()})
    started = time.perf_counter()
    speed = decode_speed(
        backends,
        args.contexts,
        vocab_size=model.config.vocab_size,
        warmup=args.warmup,
        iters=args.iters,
        threads=args.threads,
    )
    print(f"timing: {time.perf_counter() - started:.0f} s")

    machine = machine_fingerprint()
    print()
    print(
        f"machine: {machine.get('cpu_model')} ({machine.get('cores')} cores), {args.threads} threads, "
        f"onnxruntime {machine.get('ort_version')}, torch {torch.__version__}, "
        f"python {platform.python_version()}"
    )
    print(
        f"model: {model.config.model_type} {params / 1e6:.1f}M params, random_weights: {is_random}, batch 1"
    )
    print(format_table(speed))
    print()
    print(
        f"{'variant':<16}{'size MB':>9}{'KL vs fp32':>12}{'top-1 agree':>13}{'max |dlogit|':>14}"
        "  quantized ops"
    )
    fp32_mb = export["model_bytes"] / 1e6
    print(f"{'fp32':<16}{fp32_mb:>9.0f}{0.0:>12.2e}{1.0:>13.3f}{0.0:>14.3f}  -")
    for name, q in quant.items():
        ops = ", ".join(f"{k} {v}" for k, v in q["ops"].items() if k not in ("Gather", "DequantizeLinear"))
        print(
            f"{name:<16}{q['size_mb']:>9.0f}{q['kl_vs_fp32']:>12.2e}{q['top1_agreement_vs_fp32']:>13.3f}"
            f"{q['max_abs_logit_diff']:>14.3f}  {ops}"
        )
    print(f"total {time.perf_counter() - clock:.0f} s")
    if args.json:
        log.update({"random_weights": is_random, "parameters": params, "speed": speed, "quantized": quant})
        log["machine"] = machine
        args.json.write_text(json.dumps(log, indent=2, default=str))
    if scratch:
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
