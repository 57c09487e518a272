"""Weight-only INT4 and INT8 (MatMulNBits) with ONNX Runtime's MatMulNBitsQuantizer, every task.

Algorithms offered without calibration data: RTN (round to nearest, `DefaultWeightOnlyQuantConfig`,
4 or 8 bits) and HQQ (`HQQWeightOnlyQuantConfig`, half-quadratic optimisation of scales and zero
points, 4 bits). With Gather in `op_types` the embedding becomes GatherBlockQuantized (RTN only).
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
    }
