"""This machine's matrix ceilings on a model's own weight shapes, and how close a variant gets.

A transformer encoder spends most of its time in the MatMuls against its weight matrices. The
ceiling for a model at M tokens is the time ONNX Runtime's bare kernels need for exactly those
products, each shape timed in a graph of a few independent products with constant weights
(prepacked, as in a real session), through IO binding so that no copy or per-call overhead is
counted: MatMul for fp32, MatMulInteger with uint8 activations and int8 weights (u8s8) for INT8.

    shapes = weight_matmuls(onnx_path)                 # Counter {(K, N): count}
    ceilings = measure_ceilings(shapes, tokens=[64, 512], threads=2)
    fraction = model_kernel_ms(ceilings, "int8", 64, shapes) / measured_latency_ms

`fraction` is the share of the variant's latency that the ideal matrix work alone would take: 1.0
means the variant does nothing but run the matrix kernels at their standalone speed; the rest is
everything else (quantizing activations, attention scores, softmax, layer norms, GELU, framework
overhead). Attention-score products (activation x activation) are not weight MatMuls and are left
out of both the count and the ceiling; at seq <= 128 they are a few percent of the FLOPs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

# Op types whose second input, when it is a constant, is a weight matrix [K, N].
_WEIGHT_MATMULS = ("MatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "FusedMatMul")
PRECISIONS = ("fp32", "int8")


def weight_matmuls(onnx_path: Path) -> Counter[tuple[int, int]]:
    """{(K, N): count} of the MatMuls / Gemms of a graph whose second operand is a 2-D initializer.

    Read it from the plain fp32 export of a model: its Linear layers as exported, before any
    fusion or quantization changes the op types (those keep the same products)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    dims = {init.name: tuple(init.dims) for init in model.graph.initializer}
    shapes: Counter[tuple[int, int]] = Counter()
    for node in model.graph.node:
        if node.op_type not in (*_WEIGHT_MATMULS, "Gemm") or len(node.input) < 2:
            continue
        shape = dims.get(node.input[1])
        if shape is None or len(shape) != 2:
            continue
        k, n = shape
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            k, n = n, k
        shapes[(int(k), int(n))] += 1
    return shapes


def matmul_flops(shapes: Counter[tuple[int, int]], tokens: int) -> float:
    """Multiply-adds x 2 of the weight MatMuls for `tokens` rows (batch x seq)."""
    return float(sum(2 * tokens * k * n * count for (k, n), count in shapes.items()))


def _kernel_graph(precision: str, k: int, n: int, repeats: int, seed: int = 0) -> bytes:
    """A serialized graph of `repeats` independent products Y_i = A x B_i, B_i constant [K, N].

    Several kernels per run amortise the per-call cost of session.run (tens of microseconds, as
    long as one small product); distinct weights keep each product reading its own matrix from
    memory, as the model's layers do."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, weights, outputs = [], [], []
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    a_type = TensorProto.FLOAT if precision == "fp32" else TensorProto.UINT8
    y_type = TensorProto.FLOAT if precision == "fp32" else TensorProto.INT32
    if precision == "int8":
        weights.append(numpy_helper.from_array(np.array(128, dtype=np.uint8), "a_zero"))
    for i in range(repeats):
        if precision == "fp32":
            weight = rng.standard_normal((k, n)).astype(np.float32)
            nodes.append(helper.make_node("MatMul", ["A", f"B{i}"], [f"Y{i}"]))
        else:
            weight = rng.integers(-127, 128, (k, n), dtype=np.int8)
            nodes.append(helper.make_node("MatMulInteger", ["A", f"B{i}", "a_zero"], [f"Y{i}"]))
        weights.append(numpy_helper.from_array(weight, f"B{i}"))
        outputs.append(helper.make_tensor_value_info(f"Y{i}", y_type, ["M", n]))
    graph = helper.make_graph(
        nodes,
        f"{precision}_matmul_{k}x{n}",
        [helper.make_tensor_value_info("A", a_type, ["M", k])],
        outputs,
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


def measure_ceilings(
    shapes: Iterable[tuple[int, int]],
    tokens: Iterable[int],
    threads: int,
    *,
    iters: int = 30,
    warmup: int = 3,
    repeats: int = 8,
) -> dict[str, Any]:
    """Time MatMul (fp32) and MatMulInteger (u8s8) for every (K, N) at every token count.

    Each timed call runs `repeats` products through IO binding (input and outputs bound once, so
    no copies); a kernel's time is the call's median time / repeats. One session exists at a time:
    every session owns a thread pool, and an idle pool that still spins would slow the next one.
    Returns {"threads", "iters", "repeats", "per_shape": {precision: {str(tokens): {"KxN":
    {"p50_ms", "gops"}}}}}.
    """
    import gc
    import time

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    rng = np.random.default_rng(0)
    per_shape: dict[str, dict[str, dict[str, dict[str, float]]]] = {p: {} for p in PRECISIONS}
    for m in sorted(set(tokens)):
        for precision in PRECISIONS:
            for k, n in sorted(set(shapes)):
                session = ort.InferenceSession(
                    _kernel_graph(precision, k, n, repeats),
                    sess_options=options,
                    providers=["CPUExecutionProvider"],
                )
                a = (
                    rng.standard_normal((m, k)).astype(np.float32)
                    if precision == "fp32"
                    else rng.integers(0, 256, (m, k), dtype=np.uint8)
                )
                binding = session.io_binding()
                binding.bind_cpu_input("A", a)
                for i in range(repeats):
                    binding.bind_output(f"Y{i}")  # allocated by the first run, reused afterwards
                for _ in range(warmup + 1):
                    session.run_with_iobinding(binding)
                times = []
                for _ in range(iters):
                    started = time.perf_counter()
                    session.run_with_iobinding(binding)
                    times.append(time.perf_counter() - started)
                p50_ms = float(np.median(times)) * 1e3 / repeats
                per_shape[precision].setdefault(str(m), {})[f"{k}x{n}"] = {
                    "p50_ms": round(p50_ms, 5),
                    "gops": round(2 * m * k * n / (p50_ms * 1e6), 1),
                }
                del binding, session
                gc.collect()
    return {"threads": threads, "iters": iters, "repeats": repeats, "per_shape": per_shape}


def model_kernel_ms(
    ceilings: dict[str, Any], precision: str, tokens: int, counts: Counter[tuple[int, int]]
) -> float:
    """Ideal time (ms) of a model's weight MatMuls at `tokens` rows: the count-weighted sum of the
    standalone kernels' p50 (every (K, N) in `counts` must have been measured)."""
    kernels = ceilings["per_shape"][precision][str(tokens)]
    return float(sum(kernels[f"{k}x{n}"]["p50_ms"] * c for (k, n), c in counts.items()))
