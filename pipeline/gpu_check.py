"""`make gpu-check`: a recipe's built variants on ONNX Runtime's CUDA provider, in one table.

For each variant of `exported/<recipe>/` (plus the fused model converted to fp16, the precision a
GPU deployment of it uses), a CUDA session runs one batch with ORT's profiler on: where every
node really ran (a node on CPU behind the CUDA provider is a silent fallback), how its outputs
agree with fp32 on CPU (argmax agreement, max |diff|), and its p50 latency beside the CPU's.
Float variants (fp32, fused, fp16) must run entirely on CUDA: any node on CPU fails the check
(exit 1). INT8 variants are reported with the share of nodes the CUDA provider took (its dynamic
INT8 kernels are partial) and fail only when their outputs disagree with fp32.

Without a usable CUDA provider it prints one "no GPU" line and exits 0: nothing was checked.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# Ops the CUDA provider hands to CPU on purpose (shape arithmetic on small int tensors); their
# presence on CPU is not a fallback of the model's compute. Gather is among them by name, so an
# embedding Gather that fell back would go unnoticed here (the profile gives no tensor sizes).
SHAPE_OPS = {
    "Shape",
    "Gather",
    "Unsqueeze",
    "Concat",
    "Slice",
    "Squeeze",
    "Cast",
    "Reshape",
    "ConstantOfShape",
}
MIN_AGREEMENT = 0.98


def placement_verdict(placement: Mapping[str, Any], quantized: bool) -> tuple[str, int]:
    """("ok" | "FALLBACK" | "partial", compute nodes on CPU) for one variant's node placement."""
    cpu_ops = (placement.get(CPU) or {}).get("ops") or {}
    on_cpu = sum(count for op, count in cpu_ops.items() if op not in SHAPE_OPS)
    if on_cpu == 0:
        return "ok", 0
    return ("partial" if quantized else "FALLBACK"), on_cpu


def agreement(reference: np.ndarray, output: np.ndarray) -> tuple[float, float]:
    """(argmax agreement over the last axis, max |diff|) of one output vs the fp32 CPU reference."""
    reference, output = np.asarray(reference, np.float32), np.asarray(output, np.float32)
    same = float(np.mean(reference.argmax(-1) == output.argmax(-1)))
    return same, float(np.abs(reference - output).max())


def failures(rows: list[dict[str, Any]]) -> list[str]:
    """Why the check fails (empty: it passes)."""
    found = []
    for row in rows:
        if row["placement"] == "FALLBACK":
            found.append(f"{row['variant']}: {row['cpu_nodes']} compute node(s) fell back to CPU")
        if row["agreement"] < MIN_AGREEMENT:
            found.append(f"{row['variant']}: argmax agreement {row['agreement']:.3f} < {MIN_AGREEMENT}")
    return found


def table(rows: list[dict[str, Any]]) -> str:
    from tabulate import tabulate

    headers = [
        "variant",
        "placement",
        "CPU compute nodes",
        "agreement",
        "max |diff|",
        "CUDA p50 ms",
        "CPU p50 ms",
    ]
    body = [
        [
            r["variant"],
            r["placement"],
            r["cpu_nodes"],
            f"{r['agreement']:.4f}",
            f"{r['max_abs_diff']:.3g}",
            f"{r['cuda_p50_ms']:.2f}",
            f"{r['cpu_p50_ms']:.2f}",
        ]
        for r in rows
    ]
    return tabulate(body, headers=headers, tablefmt="github")


def _p50(run: Callable[[], Any], iters: int) -> float:
    run()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def _fp16_copy(fused: Path, scratch: Path) -> Path:
    """The fused model with float16 weights and compute (inputs/outputs stay float32)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fused)), keep_io_types=True)
    path = scratch / "fused-fp16.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="fused-fp16.onnx.data")
    return path


def check_variants(
    models: dict[str, Path], *, batch: int = 8, seq: int = 64, iters: int = 20, threads: int | None = None
) -> list[dict[str, Any]]:
    """One row per model: placement on CUDA, agreement with the first model (fp32) on CPU, p50s."""
    from pipeline.onnx.session import node_placement, open_session
    from pipeline.tasks import dummy_inputs

    reference_session = open_session(next(iter(models.values())), CPU, threads)
    names = [i.name for i in reference_session.get_inputs()]
    feeds = dummy_inputs(names, batch, seq, 1000)
    reference = reference_session.run(None, feeds)[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        for name, path in models.items():
            session = open_session(path, CUDA, profile_prefix=str(Path(scratch) / name))
            if session.get_providers()[0] != CUDA:
                raise InputError(f"gpu-check: {name}: the session did not take the CUDA provider")
            output = session.run(None, feeds)[0]
            placement = node_placement(session.end_profiling())
            quantized = "int8" in name or "int4" in name
            verdict, cpu_nodes = placement_verdict(placement, quantized)
            same, diff = agreement(reference, output)
            cuda = open_session(path, CUDA)
            cpu = open_session(path, CPU, threads) if "fp16" not in name else None
            rows.append(
                {
                    "variant": name,
                    "placement": verdict,
                    "cpu_nodes": cpu_nodes,
                    "agreement": same,
                    "max_abs_diff": diff,
                    "cuda_p50_ms": _p50(lambda s=cuda: s.run(None, feeds), iters),
                    "cpu_p50_ms": _p50(lambda s=cpu: s.run(None, feeds), iters) if cpu else float("nan"),
                    "nodes": placement,
                }
            )
    return rows


def gpu_check(recipe_path: Path, exported: Path = Path("exported"), out: Any = None) -> int:
    """`python -m pipeline gpu-check RECIPE`: 0 passed (or no GPU), 1 a fallback or disagreement."""
    import sys

    from pipeline.config import load_recipe
    from pipeline.onnx.io import model_file
    from pipeline.onnx.session import provider_availability

    out = out or sys.stdout
    recipe = load_recipe(recipe_path)
    usable, reason = provider_availability(CUDA)
    if not usable:
        print(f"gpu-check: no GPU ({reason}): nothing checked", file=out)
        return 0
    root = Path(exported) / recipe.name
    index_path = root / "variants.json"
    if not index_path.is_file():
        raise InputError(f"{index_path}: not found; run `make run RECIPE={recipe_path}` first")
    index = json.loads(index_path.read_text(encoding="utf-8"))["variants"]
    models = {
        name: model_file(root / entry["artifact"]) for name, entry in index.items() if entry.get("artifact")
    }
    if "fp32" not in models:
        raise InputError(f"{index_path}: no fp32 variant to compare against")
    models = {"fp32": models.pop("fp32"), **models}
    with tempfile.TemporaryDirectory(prefix="gpu-fp16-") as scratch:
        if "fused" in models:
            models["fused-fp16"] = _fp16_copy(models["fused"], Path(scratch))
        rows = check_variants(models)
    print(table(rows), file=out)
    problems = failures(rows)
    for line in problems:
        print(f"FAIL {line}", file=out)
    print(f"gpu-check {recipe.name}: {len(rows)} variant(s), {len(problems)} problem(s)", file=out)
    return 1 if problems else 0
