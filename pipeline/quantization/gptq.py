"""GPTQ for weight-only MatMulNBits: blocks rounded against real activations, on RTN's layout.

RTN rounds every weight to its nearest level on its own. GPTQ (Frantar et al., 2022) rounds the
rows of a weight one at a time and pushes each row's rounding error onto the rows not yet rounded,
weighted by the inverse Hessian H = 2 X^T X of the layer's inputs X on calibration data, so the
error of x @ W on such inputs shrinks rather than the weights' own error. The scale and integer
zero point of a block are RTN's, taken from the block's weights as updated when it is reached, so
the result is the same MatMulNBits graph as RTN's (same kernel, same speed) with other bytes.

Why not ONNX Runtime's own `GPTQWeightOnlyQuantConfig` (onnxruntime 1.32): its numpy port keeps W
as K x N but takes the error update from a column of the upper-triangular inverse-Hessian factor,
which is zero below the diagonal, so no error is ever propagated: its output is RTN's (on
SmolLM2-135M the H-weighted output error of three sampled layers was equal to RTN's to the last
digit; with the row used, as in the paper, it was 3.2-4.2x lower). It also re-runs the whole model
once per distinct MatMul input (121 times for SmolLM2), where one run collecting every input does.

The Hessians come from the fp32 model (every layer sees fp32 inputs, as in ONNX Runtime's and
Intel Neural Compressor's ports), one forward pass per calibration example.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import StageError


def gptq_blocks(
    weight: np.ndarray, hessian: np.ndarray, *, bits: int, block_size: int, damp: float = 0.01
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize `weight` (K x N, x @ weight) against `hessian` (K x K).

    Returns levels (K_padded x N, uint8 in [0, 2**bits - 1]), scales and zero points (both
    blocks x N; K is padded with zero rows to whole blocks). Dequantized: (levels - zero) * scale.
    `damp` adds that fraction of the mean diagonal to H, which keeps it invertible when the
    calibration data has fewer tokens than K or dead inputs.
    """
    maxq = 2**bits - 1
    k, n = weight.shape
    blocks = -(-k // block_size)
    padded = blocks * block_size
    w = np.zeros((padded, n), np.float32)
    w[:k] = weight
    h = np.zeros((padded, padded), np.float64)
    h[:k, :k] = hessian
    dead = np.diag(h) == 0  # inputs that are always zero (and the padding): their rows carry nothing
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h[np.diag_indices(padded)] += damp * float(np.mean(np.diag(h)))
    try:  # upper Cholesky factor of H^-1: row i holds how row i's error spreads to rows after it
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)  # float64 only to invert
    except np.linalg.LinAlgError as err:
        raise StageError(
            f"GPTQ: the calibration Hessian is not positive definite at quantize.gptq_damp {damp} "
            f"({err}); raise quantize.gptq_damp"
        ) from None

    levels = np.zeros((padded, n), np.uint8)
    scales = np.zeros((blocks, n), np.float32)
    zeros = np.zeros((blocks, n), np.float32)
    window = max(block_size, 128)  # rows updated eagerly; the rest of W gets one lazy update per window
    window -= window % block_size
    for start in range(0, padded, window):
        stop = min(start + window, padded)
        rows = w[start:stop].copy()
        errors = np.zeros_like(rows)
        local = hinv[start:stop, start:stop]
        for i in range(stop - start):
            row = start + i
            if row % block_size == 0:  # RTN's scale and zero point, from the rows as updated so far
                block = rows[i : i + block_size]
                low = np.minimum(block.min(axis=0), 0.0)
                high = np.maximum(block.max(axis=0), 0.0)
                scale = np.where(high > low, (high - low) / maxq, 1.0).astype(np.float32)
                zero = np.clip(np.round(-low / scale), 0, maxq)
                scales[row // block_size], zeros[row // block_size] = scale, zero
            q = np.clip(np.round(rows[i] / scale) + zero, 0, maxq)
            levels[row] = q
            error = (rows[i] - (q - zero) * scale) / local[i, i]
            rows[i:] -= np.outer(local[i, i:], error)
            errors[i] = error
        w[stop:] -= hinv[start:stop, stop:].T @ errors
    return levels, scales, zeros.astype(np.uint8)


def input_hessians(
    model: Any, feeds: Sequence[dict[str, np.ndarray]], input_names: Sequence[str], work: Path
) -> tuple[dict[str, np.ndarray], int]:
    """{tensor: X^T X summed over the calibration tokens} for `input_names`, and the token count.

    `model` (a ModelProto, fp32) gets the named tensors as extra outputs and is run once per feed
    from a copy saved under `work`."""
    import onnx
    from onnx import helper
    from scipy.linalg.blas import ssyrk

    from pipeline.onnx.session import open_session

    present = {output.name for output in model.graph.output}
    for name in input_names:
        if name not in present:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
    augmented = work / "gptq_inputs.onnx"
    onnx.save_model(model, str(augmented), save_as_external_data=True, location="gptq_inputs.onnx.data")
    session = open_session(augmented)
    names = list(input_names)
    sums: dict[str, np.ndarray] = {}
    tokens = 0
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed), strict=True):
            x = np.asarray(value.reshape(-1, value.shape[-1]), dtype=np.float32)
            k = x.shape[1]
            if name not in sums:
                sums[name] = np.zeros((k, k), np.float32, order="F")
            # syrk computes only the upper triangle of X^T X: about half of a full matmul's time
            # at K = 1,536 (12 vs 23 ms per 256-token article); x.T is Fortran-ordered, no copy.
            # It adds into the running sum in place (beta 1, a Fortran-ordered float32 sum): summing
            # float64 copies of every product made SmolLM2's collection (32 articles) 48 s, this
            # 34 s; each product is a float32 sum over the article's tokens anyway.
            sums[name] = ssyrk(1.0, x.T, beta=1.0, c=sums[name], trans=0, overwrite_c=1)
        tokens += int(np.prod(feed["input_ids"].shape))
    return {name: np.triu(upper) + np.triu(upper, 1).T for name, upper in sums.items()}, tokens


def apply_gptq(
    quantized: Path,
    source: Path,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    damp: float,
    external: bool,
    work: Path,
    log: logging.Logger,
) -> dict[str, Any]:
    """Re-round every MatMulNBits of `quantized` (RTN's output of `source`) with GPTQ, in place.

    Each MatMulNBits node is named after the MatMul of `source` it replaced (ONNX Runtime appends
    `_Q{bits}`); that MatMul's fp32 weight and input are what GPTQ reads."""
    import onnx
    from onnx import helper, numpy_helper

    started = time.perf_counter()
    fp32 = onnx.load(str(source), load_external_data=True)
    weights = {init.name: init for init in fp32.graph.initializer}
    matmuls = {node.name: node for node in fp32.graph.node if node.op_type == "MatMul"}
    model = onnx.load(str(quantized), load_external_data=True)
    initializers = {init.name: init for init in model.graph.initializer}
    targets = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        original = matmuls.get(node.name.rsplit("_Q", 1)[0])
        if original is None or original.input[1] not in weights:
            raise StageError(f"GPTQ: no fp32 MatMul with a constant weight in {source} for {node.name}")
        targets.append((node, attrs, original))
    # Read the weights before input_hessians saves `fp32`, which moves its tensors out to a file.
    arrays = {
        original.input[1]: numpy_helper.to_array(weights[original.input[1]]) for _, _, original in targets
    }
    inputs = sorted({original.input[0] for _, _, original in targets})
    hessians, tokens = input_hessians(fp32, feeds, inputs, work)
    collected = time.perf_counter() - started

    for node, attrs, original in targets:
        k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        weight = arrays[original.input[1]].astype(np.float32)
        if weight.shape != (k, n):
            raise StageError(f"GPTQ: {node.name}: weight shape {weight.shape}, expected {(k, n)}")
        levels, scales, zeros = gptq_blocks(
            weight, 2.0 * hessians[original.input[0]] / tokens, bits=bits, block_size=block, damp=damp
        )
        blocks = levels.shape[0] // block
        by_row = np.ascontiguousarray(levels.T).reshape(n, blocks, block)  # MatMulNBits: N x blocks x bytes
        zero_rows = np.ascontiguousarray(zeros.T)
        if bits == 4:
            by_row = by_row[..., 0::2] | (by_row[..., 1::2] << 4)  # low nibble first
            if blocks % 2:
                zero_rows = np.concatenate([zero_rows, np.zeros((n, 1), np.uint8)], axis=1)
            zero_rows = zero_rows[:, 0::2] | (zero_rows[:, 1::2] << 4)
        for index, value in ((1, by_row), (2, np.ascontiguousarray(scales.T)), (3, zero_rows)):
            init = initializers[node.input[index]]
            shape = tuple(init.dims)
            if int(np.prod(shape)) != value.size:
                raise StageError(f"GPTQ: {node.name}: {init.name} holds {shape}, not {value.size} values")
            dtype = helper.tensor_dtype_to_np_dtype(init.data_type)  # scales keep the model's float type
            init.CopyFrom(numpy_helper.from_array(value.reshape(shape).astype(dtype), init.name))
    onnx.save_model(model, str(quantized), save_as_external_data=external, location=f"{quantized.name}.data")
    seconds = time.perf_counter() - started
    log.info("GPTQ: %d MatMulNBits from %d calibration tokens in %.0f s", len(targets), tokens, seconds)
    return {
        "nodes": len(targets),
        "calibration_examples": len(feeds),
        "calibration_tokens": tokens,
        "damp": damp,
        "seconds_collecting": round(collected, 1),
        "seconds": round(seconds, 1),
    }
