"""Weight-only INT4 and INT8 (MatMulNBits) with ONNX Runtime's MatMulNBitsQuantizer, every task.

Algorithms offered without calibration data: RTN (round to nearest, `DefaultWeightOnlyQuantConfig`,
4 or 8 bits) and HQQ (`HQQWeightOnlyQuantConfig`, half-quadratic optimisation of scales and zero
points, 4 bits). HQQ's float zero points are rewritten into integer ones plus an exact correction
(`integer_zero_points`), which puts HQQ on ONNX Runtime's fast CPU kernel. With Gather in
`op_types` the embedding becomes GatherBlockQuantized (RTN only). GPTQ (pipeline.quantization.gptq,
with calibration data) starts from RTN's graph here and re-rounds its weights afterwards.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.errors import StageError, first_line
from pipeline.quantization.int8 import quiet_ort


def quantize_nbits(
    source: Path,
    target: Path,
    *,
    bits: int,
    block_size: int,
    symmetric: bool,
    accuracy_level: int | None,
    algorithm: str,
    op_types: list[str],
    nodes_to_exclude: list[str],
    external: bool,
    log: logging.Logger,
) -> dict[str, Any]:
    """Quantize `source` into `target`; returns the settings as applied."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    kinds = tuple(op_types)
    if algorithm == "hqq":
        algo_config: Any = HQQWeightOnlyQuantConfig(
            block_size=block_size, bits=bits, op_types_to_quantize=kinds
        )
    else:
        algo_config = DefaultWeightOnlyQuantConfig(
            block_size=block_size,
            bits=bits,
            is_symmetric=symmetric,
            accuracy_level=accuracy_level,
            op_types_to_quantize=kinds,
        )
    try:
        with quiet_ort(log):
            quantizer = MatMulNBitsQuantizer(
                onnx.load(str(source), load_external_data=True),
                bits=bits,
                block_size=block_size,
                is_symmetric=symmetric,
                accuracy_level=accuracy_level,
                nodes_to_exclude=list(nodes_to_exclude),
                op_types_to_quantize=kinds,
                algo_config=algo_config,
            )
            quantizer.process()
            corrected = integer_zero_points(quantizer.model.model, accuracy_level)
            quantizer.model.save_model_to_file(str(target), use_external_data_format=external)
    except Exception as err:
        raise StageError(
            f"quantize (weight_only_int{bits}, {algorithm}) failed on {source}: {first_line(err)}"
        ) from None
    return {
        "quantizer": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
        "algorithm": algorithm,
        "bits": bits,
        "block_size": block_size,
        "symmetric": symmetric if algorithm == "rtn" else False,
        "accuracy_level": accuracy_level,
        "op_types": list(kinds),
        "float_zero_points_rewritten": corrected,
    }


def integer_zero_points(model: Any, accuracy_level: int | None) -> int:
    """Give every MatMulNBits node with float zero points (HQQ's) integer ones, exactly.

    ONNX Runtime's CPU MatMulNBits has its fast int8-compute kernel only for packed integer zero
    points; with float ones it dequantizes the weights at every call (SmolLM2-135M, decode at past
    256, one interleaved run, before GroupQueryAttention: 257 ms with HQQ's float zero points, 66 ms
    after this rewrite with accuracy_level 4, RTN 65 ms). A block's dequantized weight is
    (q - z) * s with z float. Splitting z = round(z) + (z - round(z)) keeps the integer part in the
    node and moves the rest into a correction that is exact:
    x @ W = MatMulNBits(x; q, s, round(z)) + blocksum(x) @ C, where blocksum(x)[b] sums x over
    block b (a MatMul with a 0/1 matrix of K x K/block_size) and C[b, n] = (round(z) - z)[n, b] *
    s[n, b]. The two small MatMuls read K/block_size x N floats, a fifth of the packed weights'
    bytes at block 32. Their cost is mostly per node, not bytes: with the GQA graph (4-bit LM
    head, past 256) the 363 extra nodes took 6.5 of 24.6 ms of kernel time per step, decode 14.22
    vs 11.70 ms for RTN (19.06 vs 15.63 in a slower phase); block sums by Reshape + ReduceSum
    instead of the 0/1 MatMul were no faster (19.55). Returns how many nodes were rewritten.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    indicators: dict[tuple[int, int], str] = {}  # (K, block) -> the 0/1 block-sum matrix
    block_sums: dict[tuple[str, int, int], str] = {}  # (input, K, block) -> its block sums
    rewritten = 0
    nodes: list[Any] = []
    for node in graph.node:
        nodes.append(node)
        if node.op_type != "MatMulNBits" or len(node.input) < 4 or not node.input[3]:
            continue
        zero_init = initializers.get(node.input[3])
        if zero_init is None or zero_init.data_type == TensorProto.UINT8:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        blocks = -(-k // block)
        scales_init = initializers[node.input[2]]
        scales = numpy_helper.to_array(scales_init).astype(np.float32).reshape(n, blocks)
        zeros = numpy_helper.to_array(zero_init).astype(np.float32).reshape(n, blocks)
        rounded = np.clip(np.round(zeros), 0, 2**bits - 1)
        correction = ((rounded - zeros) * scales).T.astype(np.float32)  # blocks x N
        packed = rounded.astype(np.uint8)
        if bits == 4:
            if blocks % 2:
                packed = np.concatenate([packed, np.zeros((n, 1), np.uint8)], axis=1)
            packed = packed[:, 0::2] | (packed[:, 1::2] << 4)
        zero_init.CopyFrom(numpy_helper.from_array(packed, zero_init.name))
        scales_init.CopyFrom(  # HQQ writes them flat; the integer layout is N x blocks
            numpy_helper.from_array(numpy_helper.to_array(scales_init).reshape(n, blocks), scales_init.name)
        )
        if accuracy_level is not None:
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = accuracy_level
                    break
            else:
                node.attribute.append(helper.make_attribute("accuracy_level", accuracy_level))

        if (k, block) not in indicators:
            ones = np.zeros((k, blocks), np.float32)
            ones[np.arange(k), np.arange(k) // block] = 1.0
            indicators[(k, block)] = f"nbits_block_indicator_k{k}_b{block}"
            graph.initializer.append(numpy_helper.from_array(ones, indicators[(k, block)]))
        base = node.name or node.output[0]
        sums_key = (node.input[0], k, block)
        if sums_key not in block_sums:  # q/k/v (and gate/up) read the same input: sum it once
            block_sums[sums_key] = f"{base}_block_sums"
            nodes.append(
                helper.make_node(
                    "MatMul",
                    [node.input[0], indicators[(k, block)]],
                    [block_sums[sums_key]],
                    name=block_sums[sums_key],
                )
            )
        correction_name = f"{node.input[1]}_zero_point_correction"
        graph.initializer.append(numpy_helper.from_array(correction, correction_name))
        output = node.output[0]
        node.output[0] = f"{output}_integer_zero_points"
        nodes += [
            helper.make_node(
                "MatMul",
                [block_sums[sums_key], correction_name],
                [f"{base}_correction"],
                name=f"{base}_correction",
            ),
            helper.make_node(
                "Add", [node.output[0], f"{base}_correction"], [output], name=f"{base}_corrected"
            ),
        ]
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten
