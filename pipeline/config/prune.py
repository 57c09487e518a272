"""Variant step `prune`: magnitude pruning in PyTorch (unstructured, FFN neurons, heads)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config.base import StrictModel
from pipeline.config.model import TRAINABLE_TASKS


class PruneConfig(StrictModel):
    """Variant step `prune`: which weights to remove and how to recover accuracy."""

    kind: Literal["unstructured", "ffn", "heads"] = Field(
        description="unstructured: zero the smallest weights (no ORT speed-up, only a smaller gzip); "
        "ffn: drop FFN intermediate neurons; heads: drop attention heads (both physically shrink)."
    )
    amount: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Fraction removed: of the target weights (unstructured), of the FFN neurons per "
        "layer (ffn) or of the heads per layer (heads). Default 0.5; for heads give this or "
        "heads_per_layer.",
    )
    heads_per_layer: int | None = Field(
        None, ge=1, description="kind heads: number of heads dropped in every layer (instead of amount)."
    )
    targets: list[Literal["attention", "ffn"]] = Field(
        ["attention", "ffn"],
        min_length=1,
        description="kind unstructured: which Linear layers of each block are pruned "
        "(attention = Q/K/V/output projections, ffn = up/down projections).",
    )
    scope: Literal["global", "layer"] = Field(
        "global",
        description="kind unstructured: rank all target weights together (global) or prune every "
        "Linear to `amount` on its own (layer). Structured kinds are always uniform per layer so "
        "that the config describes the shapes.",
    )
    recover_epochs: int = Field(0, ge=0, description="Fine-tune epochs after pruning (0 = no recovery).")
    recover_lr: float | None = Field(
        None, gt=0, description="Recovery learning rate; default: the recipe's finetune.lr (or its default)."
    )
    recover_method: Literal["full", "lora"] | None = Field(
        None,
        description="How recovery trains (as finetune.method; LoRA adapters merged afterwards); "
        "default: the recipe's finetune.method, else full. Structured kinds only: a merged LoRA "
        "update is dense and would refill an unstructured prune's zeros.",
    )
    distill: bool = Field(
        False, description="Recovery also distils the unpruned model's logits (teacher = reference model)."
    )
    temperature: float = Field(2.0, gt=0, description="Distillation softmax temperature.")
    alpha: float = Field(
        0.5, ge=0, le=1, description="Distillation weight: loss = alpha * KD + (1 - alpha) * task loss."
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_amount(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("amount") is None:
            if not (data.get("kind") == "heads" and data.get("heads_per_layer") is not None):
                data = {**data, "amount": 0.5}
        return data

    @model_validator(mode="after")
    def _check_combinations(self) -> PruneConfig:
        if self.kind == "heads":
            if self.heads_per_layer is not None and self.amount is not None:
                raise ValueError("heads: give either amount or heads_per_layer, not both")
        elif self.heads_per_layer is not None:
            raise ValueError(f"heads_per_layer applies to kind heads only, not {self.kind!r}")
        if self.kind != "unstructured":
            if set(self.targets) != {"attention", "ffn"}:
                raise ValueError(f"targets applies to kind unstructured only, not {self.kind!r}")
            if self.scope != "global":
                raise ValueError(
                    f"scope applies to kind unstructured only; {self.kind} pruning is uniform per layer "
                    "(a non-uniform shape cannot be described by the HF config)"
                )
        if self.recover_epochs == 0 and (
            self.distill or self.recover_lr is not None or self.recover_method is not None
        ):
            raise ValueError("distill / recover_lr / recover_method need recover_epochs >= 1")
        if self.kind == "unstructured" and self.recover_method == "lora":
            raise ValueError(
                "recover_method: lora cannot recover an unstructured prune (the merged update is dense "
                "and refills the zeros); use full"
            )
        return self

    def problem_for_task(self, task: str) -> str | None:
        """Why this config cannot prune a model of `task` ("field: reason"), or None."""
        if self.recover_epochs and task not in TRAINABLE_TASKS:
            return f"recover_epochs: a {task} model cannot be fine-tuned here; set recover_epochs: 0"
        return None
