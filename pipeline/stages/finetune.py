"""Fine-tune stage: train a task head on an encoder (also used to recover accuracy after pruning)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from pipeline.config import StrictModel
from pipeline.registry import StageContext, stage


class FinetuneConfig(StrictModel):
    """Recipe section `finetune`: how to fine-tune the source model on the task's train split."""

    epochs: int = Field(3, ge=1, description="Training epochs; the best epoch on eval is kept.")
    lr: float = Field(5e-5, gt=0, description="Peak learning rate (AdamW).")
    batch_size: int = Field(16, ge=1, description="Training batch size.")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Fraction of steps for linear warm-up.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    seed: int = Field(0, description="Seed for initialisation, shuffling and dropout.")


@stage("finetune", config=FinetuneConfig, consumes="hf", produces="hf", data_splits=("train", "eval"))
def finetune(ctx: StageContext) -> dict[str, Any]:
    """Fine-tune the model on the recipe's train split, keep the best epoch on eval."""
    raise NotImplementedError("finetune stage: not implemented yet")
