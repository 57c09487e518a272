"""Variant step `quantize`: dynamic INT8, static INT8 with calibration, weight-only INT4."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import StrictModel

Mode = Literal["dynamic", "static", "weight_only_int4", "weight_only_int8"]
WEIGHT_ONLY = ("weight_only_int4", "weight_only_int8")
# Field -> the modes it applies to. A non-default value under another mode is a recipe error.
_MODE_FIELDS: dict[str, tuple[str, ...]] = {
    "per_channel": ("dynamic", "static"),
    "reduce_range": ("dynamic", "static"),
    "weight_type": ("dynamic", "static"),
    "matmul_const_b_only": ("dynamic", "static"),
    "auto_exclude": ("dynamic", "static"),
    "activation_type": ("static",),
    "format": ("static",),
    "integer_ops": ("static",),
    "excluded_as": ("static",),
    "quantize_matmul_outputs": ("static",),
    "calibration": ("static",),
    "percentile": ("static",),
    "block_size": WEIGHT_ONLY,
    "accuracy_level": WEIGHT_ONLY,
    "int4_symmetric": WEIGHT_ONLY,
    "int4_algorithm": ("weight_only_int4",),
    "gptq_damp": ("weight_only_int4",),
    "lm_head_bits": WEIGHT_ONLY,
}


class AutoExcludeConfig(StrictModel):
    """Automatic exclusion: keep the nodes that hurt the task metric most in float, until it holds.

    Candidates are ranked once, by how hard their input is to quantize (max |x| / std over the tune
    examples, from one fp32 pass: measured on the default recipe, it ranks nodes like their effect on
    agreement with fp32, Spearman 0.64). Then, worst first, one node at a time is kept in float, the
    model quantized again and scored on the tune split with the task's headline metric, until the
    drop vs the fp32 input is within `max_metric_drop` or `max_nodes` are excluded.
    What an excluded node runs as (fp32 or dynamic INT8) is the step's `excluded_as`.
    """

    max_nodes: int = Field(8, ge=1, description="Budget: at most this many nodes are kept in float.")
    max_metric_drop: float | None = Field(
        None,
        ge=0,
        description="Target: the largest drop of the task's headline metric on the tune split (vs the "
        "fp32 input, positive = worse) to stop at. None = the gates' limit (max_metric_drop, or "
        "max_metric_drop_relative x the input's tune metric, the tighter of the two).",
    )
    samples: int | None = Field(
        None, ge=1, description="Score on the first N tune examples only (None: all of them)."
    )


class QuantizeConfig(StrictModel):
    """Variant step `quantize`."""

    mode: Mode = Field(
        "dynamic",
        description="dynamic INT8, static INT8 (calibrated), or weight-only INT4 / INT8 (MatMulNBits). "
        "Weight-only INT8 with accuracy_level 4 quantizes activations per row and block at run time: "
        "measured on SmolLM2-135M, +0.3% perplexity; dynamic INT8 (one activation scale per matrix) gave "
        "+60%, its scale set by the attention-sink token's outliers.",
    )
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
    integer_ops: bool = Field(
        True,
        description="Static QDQ: rewrite each weight MatMul (and its bias Add) into ONNX Runtime's "
        "MatMulIntegerToFloat, let float consumers of a quantized tensor read the float tensor (no "
        "Q -> DQ round trip) and merge duplicate Q/DQ nodes (pipeline.quantization.qdq): the form ORT's "
        "CPU kernels run fastest (default recipe, batch 8: ORT profiler kernel time 55.2 -> 40.1 ms). "
        "false keeps the plain QDQ graph, for execution providers that consume QDQ themselves "
        "(TensorRT, QNN, OpenVINO).",
    )
    excluded_as: Literal["float", "dynamic"] = Field(
        "float",
        description="Static: what a node left out of static INT8 (nodes_to_exclude, auto_exclude) runs "
        "as: float, or dynamic INT8 (ORT's dynamic quantizer on those MatMul/Gemm nodes only: ranges "
        "taken per call, so the activation outliers a calibrated range clips cost little, at INT8 "
        "speed). Automatic exclusion scores its candidates in this form.",
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
        "attention MatMuls quantized too). ORT's QDQ quantizer ignores this option, so for static QDQ "
        "the activation x activation MatMuls are excluded by name instead.",
    )
    quantize_matmul_outputs: bool = Field(
        False,
        description="Static QDQ: also quantize every MatMul's output (ONNX Runtime's default). Off: the "
        "products stay float (MatMulIntegerToFloat), as in dynamic INT8. Measured on the default "
        "recipe: on, static INT8 lost 3.5 F1 points; off, 0.2.",
    )
    auto_exclude: AutoExcludeConfig | None = Field(
        None,
        description="Dynamic/static: keep the nodes that hurt the task metric most in float until its "
        "drop on the tune split is within a target (see AutoExcludeConfig). Needs data.tune.",
    )
    block_size: int = Field(
        32, ge=16, description="Weight-only: weights per scale block (a power of two >= 16)."
    )
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = Field(
        None,
        description="Weight-only: MatMulNBits compute type (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 "
        "activations: fastest on CPU). None = unset for INT4, 4 for INT8 (with 0, 8-bit weights were "
        "7.6x slower than fp32 at decode).",
    )
    int4_symmetric: bool = Field(False, description="Weight-only: symmetric blocks (no zero points).")
    int4_algorithm: Literal["rtn", "hqq", "gptq"] = Field(
        "rtn",
        description="weight_only_int4: rtn (round to nearest), hqq (half-quadratic optimisation of "
        "scales and zero points) or gptq (RTN's blocks, rounded row by row against the inputs' Hessian "
        "on data.calibration, so the error of the layer's output shrinks; same graph and speed as rtn). "
        "HQQ's float zero points are rewritten to integer ones plus an exact correction, so it runs on "
        "ONNX Runtime's fast CPU kernel too. Measured on SmolLM2-135M (whose weights sit on a 4-bit grid "
        "of blocks of 32), accuracy_level 4, 4-bit LM head: perplexity (fp32 29.74) rtn b32 38.77, gptq "
        "b32 36.11, gptq b64 38.32, hqq b32 32.53; hqq's zero-point correction (3 small nodes per "
        "MatMulNBits) makes decode about 1.2x slower than rtn, b64 blocks make it about 5% faster.",
    )
    gptq_damp: float = Field(
        0.01,
        gt=0,
        le=1,
        description="int4_algorithm gptq: fraction of the Hessian's mean diagonal added to it (keeps it "
        "invertible with few calibration tokens; larger rounds more like RTN).",
    )
    quantize_embedding: bool | None = Field(
        None,
        description="Also quantize the token-embedding Gather. None = per mode: yes for static INT8 "
        "(as small as dynamic: 23 vs 59 MB on the default recipe, no F1 cost measured), no for INT4 and "
        "for decoders; dynamic INT8 of encoders quantizes it anyway with ORT's integer-op set. INT4 "
        "embeddings need int4_algorithm rtn.",
    )
    quantize_lm_head: bool = Field(
        False,
        description="text-generation: also quantize the LM head (a tied head is untied first, which "
        "makes the file bigger). Off by default: it cost the most quality where measured.",
    )
    lm_head_bits: Literal[4, 8] | None = Field(
        None,
        description="Weight-only, with quantize_lm_head: the LM head's own bits (RTN, same block size and "
        "accuracy_level; None = the mode's). The head is the largest matrix of a small LLM and is read at "
        "every decode step. Measured on SmolLM2-135M with HQQ INT4 layers: a 4-bit head cost +9.4% "
        "perplexity, an 8-bit head +0.1%.",
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
        description="Fail the variant when the argmax of the quantized model's outputs agrees with the "
        "fp32 input's on fewer than this fraction of (non-padded) positions of the parity shapes (random "
        "inputs). None = reported, not enforced: a lossy step is judged by the task metric on real data "
        "(the tune split here, the eval split and the gates in validation).",
    )
    min_cosine_mean: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="Fail the variant when the mean cosine similarity of the (non-padded, per-token) "
        "output vectors to the fp32 input's falls below this on the parity shapes. None = reported, "
        "not enforced.",
    )

    @model_validator(mode="after")
    def _check_mode_fields(self) -> QuantizeConfig:
        for name, modes in _MODE_FIELDS.items():
            if self.mode not in modes and getattr(self, name) != type(self).model_fields[name].default:
                raise ValueError(f"{name} does not apply to mode {self.mode} (only to {', '.join(modes)})")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.quantize_matmul_outputs and self.format != "QDQ":
            raise ValueError("quantize_matmul_outputs applies to format QDQ only")
        if self.lm_head_bits is not None and not self.quantize_lm_head:
            raise ValueError("lm_head_bits needs quantize_lm_head: true")
        if self.int4_algorithm == "gptq" and self.int4_symmetric:
            raise ValueError("int4_symmetric: gptq rounds asymmetric blocks only; use int4_algorithm rtn")
        if self.int4_algorithm == "hqq" and self.quantize_embedding:
            raise ValueError(
                "quantize_embedding: HQQ cannot quantize the embedding (ONNX Runtime has no float zero "
                "points for GatherBlockQuantized); use int4_algorithm rtn or quantize_embedding false"
            )
        return self

    def reads_calibration(self) -> bool:
        """Whether this step calibrates on data.calibration (static INT8 ranges, GPTQ's Hessians)."""
        return self.mode == "static" or self.int4_algorithm == "gptq"

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
