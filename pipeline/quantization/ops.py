"""Operator counts of quantized graphs, and the check that a quantizer really quantized something."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import StageError
from pipeline.onnx.io import count_ops

# Node types counted in the manifest: what the quantizers produce, plus float ops left over.
QUANT_OPS = (
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeLinear",
    "DynamicQuantizeMatMul",
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearMatMul",
    "QGemm",
    "QAttention",
    "QEmbedLayerNormalization",
    "MatMulNBits",
    "GatherBlockQuantized",
    "MatMul",
    "Gemm",
    "Gather",
)


def quantized_ops(path: Path) -> dict[str, int]:
    return count_ops(path, QUANT_OPS)


def check_quantized(config: Any, counts: dict[str, int], target: Path) -> None:
    """A quantizer that quietly quantized nothing (types not inferred, no matching ops) fails."""
    if config.mode.startswith("weight_only"):
        done = counts["MatMulNBits"]
    elif config.mode == "dynamic":
        done = counts["MatMulInteger"] + counts["QAttention"] + counts["DynamicQuantizeMatMul"]
    elif config.format == "QDQ":
        done = counts["QuantizeLinear"]
    else:
        done = counts["QLinearMatMul"] + counts["QGemm"] + counts["QAttention"]
    if not done:
        raise StageError(
            f"quantize ({config.mode}): no operator was quantized in {target} "
            f"(op counts {', '.join(f'{k}={v}' for k, v in counts.items() if v)}); check op_types"
        )
