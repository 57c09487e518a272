"""Variant step `adapters`: LoRA adapters of a decoder, one per label of the train data, served by
ONNX Runtime from one base model (pipeline.stages.adapters)."""

from __future__ import annotations

from pydantic import Field

from pipeline.config.base import StrictModel
from pipeline.config.finetune import LoraSettings


class AdaptersConfig(StrictModel):
    """Variant step `adapters`: which adapters to train, how, and how to score them."""

    labels: list[str] = Field(
        min_length=1,
        description="One adapter per label: trained on the data.train texts of that label (e.g. the "
        "BBC News folder names business, sports) and scored on the data.eval texts of every label.",
    )
    lora: LoraSettings = Field(
        default_factory=lambda: LoraSettings(dropout=0.05),
        description="Rank, alpha, dropout and layers of every adapter; default: rank 8 on every "
        "linear layer of the decoder blocks (q/k/v/o and MLP projections; never the LM head).",
    )
    steps: int = Field(60, ge=1, description="Training steps per adapter (AdamW, linear decay).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of the adapters.")
    window: int = Field(128, ge=8, description="Tokens per training window (next-token loss).")
    batch_size: int = Field(4, ge=1, description="Windows per training step.")
    seed: int = Field(0, description="Seed of the adapters' initialisation and window order.")
    eval_tokens: int = Field(
        3000, ge=16, description="Held-out tokens per label scored for perplexity (data.eval texts)."
    )
