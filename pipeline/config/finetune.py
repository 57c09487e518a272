"""Recipe section `finetune`: training a task head (also the defaults of pruning recovery)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import StrictModel

# Peak learning rates when the recipe gives none: an adapter of rank r moves far fewer weights than a
# full fine-tune and needs a ~10x larger step (the LoRA paper's GLUE runs: 4e-4 to 5e-4).
DEFAULT_LR = {"full": 5e-5, "lora": 5e-4}


class LoraSettings(StrictModel):
    """Recipe section `finetune.lora`: the low-rank adapters of `method: lora` (peft's LoraConfig)."""

    r: int = Field(
        8, ge=1, le=1024, description="Rank of every adapter: W + (alpha / r) * B @ A, A is r x in."
    )
    alpha: float = Field(16.0, gt=0, description="Scale of the adapters' update: alpha / r times B @ A.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on each adapter's input while training.")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="Layers that get adapters: module names or name suffixes, matched as peft matches "
        "them (e.g. [query, value]). Default: every linear layer of the encoder, the task head "
        "excluded: for BERT/MiniLM query, key, value, attention.output.dense, intermediate.dense and "
        "output.dense; for DistilBERT q_lin, k_lin, v_lin, out_lin, lin1, lin2; for RoBERTa/ELECTRA "
        "as BERT.",
    )


class FinetuneConfig(StrictModel):
    """Recipe section `finetune`: how to fine-tune the source model on the task's train split."""

    method: Literal["full", "lora"] = Field(
        "full",
        description="full: train every weight. lora: freeze the model, train low-rank adapters "
        "(finetune.lora) and the task head in full, then merge the adapters into the weights "
        "(peft merge_and_unload), so the saved checkpoint is a plain model; the merge is checked "
        "against the unmerged model's logits.",
    )
    lora: LoraSettings = Field(
        default_factory=LoraSettings, description="Adapter settings of method lora (rank, alpha, layers)."
    )
    epochs: int = Field(3, ge=1, description="Training epochs; the best epoch on tune (else eval) is kept.")
    lr: float | None = Field(
        None,
        gt=0,
        description="Peak learning rate (AdamW); default 5e-5 for method full, 5e-4 for method lora.",
    )
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

    @model_validator(mode="after")
    def _lora_needs_method(self) -> FinetuneConfig:
        # Compared with the defaults, not model_fields_set: the runner re-validates full dumps.
        if self.method != "lora" and self.lora != LoraSettings():
            raise ValueError("lora: adapter settings are given but method is full; set method: lora")
        return self

    @property
    def learning_rate(self) -> float:
        """The peak learning rate: the recipe's lr, else the method's default."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]
