"""Variant step `optimize`: ONNX Runtime transformer fusions."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import StrictModel


class OptimizeConfig(StrictModel):
    """Variant step `optimize`: graph fusion with onnxruntime.transformers.optimizer."""

    require_attention_fusion: bool = Field(
        True, description="Fail when fewer Attention nodes than layers are fused."
    )
    group_query_attention: bool | None = Field(
        None,
        description="text-generation (Llama, Mistral without sliding window, Qwen2): after ORT's "
        "fusions, replace each layer's attention with GroupQueryAttention (ORT fuses none in optimum's "
        "export; SmolLM2-135M INT4 decode 72 -> 48 ms). None = where it applies, reporting why not "
        "elsewhere; true = fail when it does not apply; false = keep ORT's graph.",
    )
    rotary_in_attention: bool | None = Field(
        False,
        description="text-generation, with the GroupQueryAttention rewrite: GQA rotates q and k itself "
        "(do_rotary) and reads the packed q/k/v projection, so each layer's 2 RotaryEmbedding and its "
        "q/k/v Split go (SmolLM2: 468 -> 408 nodes). ONNX Runtime then rotates by cache slot: logits "
        "stay Hugging Face's, but a left-padded row's cached keys are rotated by its pad count, so the "
        "cache is valid only for this model at the slots it was computed at (parity is proven in that "
        "format). Needs a head size that is a multiple of 16 and one unscaled, full rotary for q and k. "
        "None = where it applies, reporting why not elsewhere; true = fail when it does not apply; "
        "false = RotaryEmbedding nodes before GQA.",
    )
    model_type: Literal["bert", "gpt2", "gpt_neox"] | None = Field(
        None,
        description="ORT optimizer model type; by default derived from config.json `model_type` "
        "(bert, roberta, xlm-roberta, camembert, distilbert, electra -> bert; gpt2; gpt_neox).",
    )
    opt_level: Literal[0, 1, 2, 99] | None = Field(
        None,
        description="ONNX Runtime graph optimization level applied before the fusions (None = ORT's "
        "default for the model type, 1 for BERT). Levels 2 and 99 bake provider-specific ops into "
        "the file: only use them for the provider you deploy on.",
    )
    parity_atol: float | None = Field(
        None,
        gt=0,
        description="Largest allowed |fused - unfused| on the recipe's parity shapes "
        "(export.parity.shapes). Default: the larger of 1e-3 and export.parity.atol for fp32, 5e-2 "
        "with fp16.",
    )
    fp16: bool = Field(
        False,
        description="GPU-ONLY: convert the fused model to float16 (inputs/outputs stay float32). "
        "The CPU provider has no fp16 kernels for the fused ops, so the parity check needs a working "
        "CUDAExecutionProvider; on a CPU-only machine this fails.",
    )
    fp16_op_block_list: list[str] | None = Field(
        None,
        description="Operator types kept in float32 by the fp16 conversion (None = ORT's default "
        "block list). Only with fp16.",
    )

    @model_validator(mode="after")
    def _block_list_needs_fp16(self) -> OptimizeConfig:
        if self.fp16_op_block_list is not None and not self.fp16:
            raise ValueError("fp16_op_block_list only applies with fp16: true")
        return self

    def problem_for_task(self, task: str) -> str | None:
        """Why this config cannot optimize a model of `task` ("field: reason"), or None."""
        if task == "text-generation" and self.fp16:
            return "fp16: not supported for text-generation models"
        if task != "text-generation" and self.group_query_attention:
            return "group_query_attention: applies to text-generation models only"
        if self.rotary_in_attention and (task != "text-generation" or self.group_query_attention is False):
            return "rotary_in_attention: needs a text-generation model and the group_query_attention rewrite"
        return None
