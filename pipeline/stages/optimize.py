"""Optimize stage: ONNX Runtime transformer fusions (Attention, SkipLayerNorm, BiasGelu, ...)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from pipeline.config import StrictModel
from pipeline.registry import StageContext, stage


class OptimizeConfig(StrictModel):
    """Variant step `optimize`: graph fusion with onnxruntime.transformers.optimizer."""

    require_attention_fusion: bool = Field(
        True, description="Fail when fewer Attention nodes than layers are fused."
    )


@stage("optimize", config=OptimizeConfig, consumes="onnx", produces="onnx")
def optimize(ctx: StageContext) -> dict[str, Any]:
    """Fuse the graph with ONNX Runtime's transformer optimizer."""
    raise NotImplementedError("optimize stage: not implemented yet")
