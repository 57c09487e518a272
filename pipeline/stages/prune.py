"""Prune stage: magnitude pruning in PyTorch, unstructured or structured (FFN neurons, heads)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from pipeline.config import StrictModel
from pipeline.registry import StageContext, stage


class PruneConfig(StrictModel):
    """Variant step `prune`: which weights to remove and how to recover accuracy."""

    kind: Literal["unstructured", "ffn", "heads"] = Field(
        description="unstructured: zero weights (no ORT speed-up); ffn / heads: physically shrink."
    )
    amount: float = Field(0.5, gt=0, lt=1, description="Fraction of weights / neurons / heads removed.")
    recover_epochs: int = Field(0, ge=0, description="Fine-tune epochs after pruning (0 = none).")


@stage("prune", config=PruneConfig, consumes="hf", produces="hf", data_splits=("train", "eval"))
def prune(ctx: StageContext) -> dict[str, Any]:
    """Prune the model by weight magnitude."""
    raise NotImplementedError("prune stage: not implemented yet")
