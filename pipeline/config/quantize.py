"""Variant step `quantize`: dynamic INT8, static INT8 with calibration, weight-only INT4."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import StrictModel

Mode = Literal["dynamic", "static", "weight_only_int4"]
# Field -> the modes it applies to. A non-default value under another mode is a recipe error.
_MODE_FIELDS: dict[str, tuple[str, ...]] = {
    "per_channel": ("dynamic", "static"),
    "reduce_range": ("dynamic", "static"),
    "weight_type": ("dynamic", "static"),
    "matmul_const_b_only": ("dynamic", "static"),
    "auto_exclude": ("dynamic", "static"),
    "activation_type": ("static",),
    "format": ("static",),
    "calibration": ("static",),
    "percentile": ("static",),
    "block_size": ("weight_only_int4",),
    "accuracy_level": ("weight_only_int4",),
    "int4_symmetric": ("weight_only_int4",),
    "int4_algorithm": ("weight_only_int4",),
}


class AutoExcludeConfig(StrictModel):
    """Automatic exclusion of the quantized nodes that hurt the output most."""

    max_nodes: int = Field(
        3, ge=1, description="Budget: at most this many nodes are left in float (the most sensitive)."
    )
    min_sqnr_db: float | None = Field(
        None,
        description="Target: stop excluding once the quantized model's output SQNR vs fp32 on the "
        "sensitivity examples reaches this many dB. Without any target, exactly max_nodes are excluded.",
    )
    min_argmax_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Target: stop excluding once argmax agreement with fp32 on the sensitivity "
        "examples reaches this (with min_sqnr_db, both must hold).",
    )
    samples: int = Field(
        16, ge=1, description="Calibration examples (the first N) used to measure sensitivity."
    )


class QuantizeConfig(StrictModel):
    """Variant step `quantize`."""

    mode: Mode = Field("dynamic", description="dynamic INT8, static INT8 (calibrated), or INT4 weight-only.")
    per_channel: bool = Field(True, description="Per-channel weight scales (dynamic, static).")
    reduce_range: bool | None = Field(
        None,
        description="7-bit weights (dynamic, static). None = from the machine fingerprint: true on x86 "
        "without VNNI (avoids U8S8 saturation), false elsewhere.",
    )
    weight_type: Literal["auto", "QInt8", "QUInt8"] = Field(
        "auto", description="Weight type (dynamic, static). auto = QInt8."
    )
    activation_type: Literal["auto", "QUInt8", "QInt8"] = Field(
        "auto",
        description="Activation type (static; dynamic always uses uint8). auto = from the machine "
        "fingerprint: QUInt8 on x86 (U8S8, 2x faster than S8S8 with VNNI), QInt8 elsewhere.",
    )
    format: Literal["QDQ", "QOperator"] = Field(
        "QDQ", description="Static only: QuantizeLinear/DequantizeLinear pairs or QLinear* operators."
    )
    calibration: Literal["MinMax", "Entropy", "Percentile"] = Field(
        "MinMax", description="Static only: how activation ranges are computed from calibration data."
    )
    percentile: float = Field(
        99.999, gt=0, le=100, description="Percentile calibration only: the percentile kept."
    )
    op_types: list[str] | None = Field(
        None,
        description="Operator types to quantize. None = per mode: static MatMul, Gemm (quantizing all "
        "ops puts Q/DQ on the attention mask and destroys accuracy); dynamic ONNX Runtime's integer-op "
        "set (MatMul, Attention, Gather, EmbedLayerNormalization, ...); weight_only_int4 MatMul.",
    )
    nodes_to_exclude: list[str] = Field([], description="Node names kept in float (must exist in the graph).")
    matmul_const_b_only: bool | None = Field(
        None,
        description="Quantize only MatMuls whose B is a constant weight (dynamic, static). None = "
        "ONNX Runtime's default: true for dynamic, false for static (activation x activation "
        "attention MatMuls quantized too).",
    )
    auto_exclude: AutoExcludeConfig | None = Field(
        None,
        description="Dynamic/static: measure each quantized node's damage on calibration data "
        "(quantized alone vs fp32, output SQNR) and keep the worst in float, up to a budget or a target.",
    )
    block_size: int = Field(
        32, ge=16, description="weight_only_int4: weights per scale block (a power of two >= 16)."
    )
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = Field(
        None,
        description="weight_only_int4: MatMulNBits compute type (0/None unset, 1 fp32, 2 fp16, 3 bf16, "
        "4 int8 activations: fastest on CPU).",
    )
    int4_symmetric: bool = Field(False, description="weight_only_int4: symmetric blocks (no zero points).")
    int4_algorithm: Literal["rtn", "hqq"] = Field(
        "rtn",
        description="weight_only_int4: rtn (round to nearest) or hqq (half-quadratic optimisation of "
        "scales and zero points); neither needs calibration data.",
    )
    quantize_embedding: bool = Field(
        False,
        description="Also quantize the token-embedding Gather (static INT8 and INT4: a much smaller "
        "file; dynamic INT8 of encoders quantizes it anyway with ORT's integer-op set). INT4 embeddings "
        "need int4_algorithm rtn.",
    )
    quantize_lm_head: bool = Field(
        False,
        description="text-generation: also quantize the LM head (a tied head is untied first, which "
        "makes the file bigger). Off by default: it cost the most quality where measured.",
    )
    parity_atol: float | None = Field(
        None,
        gt=0,
        description="Fail when max |quantized - fp32| on the parity shapes exceeds this. None = report "
        "only (quantization error is expected; argmax agreement is the check).",
    )
    min_argmax_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Fail when the argmax of the quantized model's outputs agrees with the fp32 "
        "input's on fewer than this fraction of (non-padded) positions of the parity shapes. None = "
        "0.9 for tasks whose outputs are class scores; not checked for feature-extraction, whose "
        "outputs are hidden states (their argmax is no prediction; min_cosine checks them).",
    )
    min_cosine_mean: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="Fail when the mean cosine similarity of the (non-padded, per-token) output "
        "vectors to the fp32 input's falls below this on the parity shapes. None = 0.98 for "
        "feature-extraction, not checked for class scores.",
    )

    @model_validator(mode="after")
    def _check_mode_fields(self) -> QuantizeConfig:
        for name, modes in _MODE_FIELDS.items():
            if self.mode not in modes and getattr(self, name) != type(self).model_fields[name].default:
                raise ValueError(f"{name} does not apply to mode {self.mode} (only to {', '.join(modes)})")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.int4_algorithm == "hqq" and self.quantize_embedding:
            raise ValueError(
                "quantize_embedding: HQQ cannot quantize the embedding (ONNX Runtime has no float zero "
                "points for GatherBlockQuantized); use int4_algorithm rtn or quantize_embedding false"
            )
        return self

    def problem_for_task(self, task: str) -> str | None:
        """Why this config cannot quantize a model of `task` ("field: reason"), or None."""
        if task != "text-generation" and self.quantize_lm_head:
            return "quantize_lm_head: applies to text-generation models only"
        if task == "text-generation":
            if self.mode == "static":
                return (
                    "mode: static is not supported for text-generation models "
                    "(use dynamic or weight_only_int4)"
                )
            if self.auto_exclude is not None:
                return "auto_exclude: not supported for text-generation models (list nodes_to_exclude)"
        return None
