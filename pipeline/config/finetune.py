"""Recipe section `finetune`: training a task head (also the defaults of pruning recovery)."""

from __future__ import annotations

from pydantic import Field

from pipeline.config.base import StrictModel


class FinetuneConfig(StrictModel):
    """Recipe section `finetune`: how to fine-tune the source model on the task's train split."""

    epochs: int = Field(3, ge=1, description="Training epochs; the best epoch on eval is kept.")
    lr: float = Field(5e-5, gt=0, description="Peak learning rate (AdamW).")
    batch_size: int = Field(16, ge=1, description="Training batch size.")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Fraction of steps for linear warm-up.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on biases/LayerNorm).")
    seed: int = Field(0, description="Seed for initialisation, shuffling and dropout.")
    group_by_length: bool = Field(
        False,
        description="Batch examples of similar length together (groups of 50 batches sorted by "
        "length, batch order shuffled): far less padding, so faster epochs. On WNUT-16 random batches "
        "carry 98k tokens per epoch for 59k real ones; grouped, 60k. Leave off when length predicts "
        "the label (batches would hold one class).",
    )
    max_length: int | None = Field(
        None, ge=8, le=8192, description="Truncation length while training; default: model.max_length."
    )
    eval_batch_size: int = Field(64, ge=1, description="Batch size when scoring the eval split.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm (null: none).")
    eval_every_epoch: bool = Field(
        True, description="Score eval after every epoch and keep the best; false: only after the last."
    )
    max_train_examples: int | None = Field(
        None, ge=1, description="Use only the first N train examples (reduced runs, CI)."
    )
    max_eval_examples: int | None = Field(
        None, ge=1, description="Score only the first N eval examples (reduced runs, CI)."
    )
