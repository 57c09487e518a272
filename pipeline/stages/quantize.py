"""Quantize stage: dynamic INT8, static INT8 with calibration, weight-only INT4."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from pipeline.config import StrictModel
from pipeline.registry import StageContext, stage


class QuantizeConfig(StrictModel):
    """Variant step `quantize`."""

    mode: Literal["dynamic", "static", "weight_only_int4"] = Field(
        "dynamic", description="dynamic INT8, static INT8 (calibrated), or INT4 weight-only."
    )
    per_channel: bool = Field(True, description="Per-channel weight scales.")


@stage("quantize", config=QuantizeConfig, consumes="onnx", produces="onnx", data_splits=("calibration",))
def quantize(ctx: StageContext) -> dict[str, Any]:
    """Quantize the ONNX model."""
    raise NotImplementedError("quantize stage: not implemented yet")
