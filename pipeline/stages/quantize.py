"""Quantize stage: dynamic INT8, static INT8 with calibration, weight-only INT4.

Every quantized model is loaded in ONNX Runtime, compared with its fp32 input on the recipe's
shape grid (max |diff| reported, argmax agreement enforced), and its size and quantized-op counts
go into the manifest. Defaults follow what was measured on these library versions (DESIGN.md §7):
static INT8 quantizes MatMul/Gemm only (quantizing everything puts Q/DQ on the attention mask),
U8S8 on x86 with VNNI, reduce_range without VNNI, and `DefaultTensorType` always set so fused
graphs (com.microsoft ops without type inference) quantize.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config import StrictModel
from pipeline.errors import InputError, StageError
from pipeline.registry import StageContext, stage

# Node types counted in the manifest: what the quantizers produce, plus float MatMuls left over.
QUANT_OPS = (
    "MatMulInteger",
    "DynamicQuantizeLinear",
    "DynamicQuantizeMatMul",
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearMatMul",
    "QGemm",
    "QAttention",
    "QEmbedLayerNormalization",
    "MatMulNBits",
    "MatMul",
    "Gemm",
)
_PROTO_LIMIT = 2**31 - 1

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
        return self


def _min_agreement(config: QuantizeConfig, task: str) -> float | None:
    if config.min_argmax_agreement is not None:
        return config.min_argmax_agreement
    return None if task == "feature-extraction" else 0.9


def _min_cosine_mean(config: QuantizeConfig, task: str) -> float | None:
    if config.min_cosine_mean is not None:
        return config.min_cosine_mean
    return 0.98 if task == "feature-extraction" else None


def _splits_read(config: QuantizeConfig) -> tuple[str, ...]:
    """Calibration data is read by static quantization and by the sensitivity analysis only: a
    dynamic or INT4 variant does not re-run when the calibration split changes."""
    return ("calibration",) if config.mode == "static" or config.auto_exclude is not None else ()


@stage("quantize", config=QuantizeConfig, consumes="onnx", produces="onnx", data_splits=_splits_read)
def quantize(ctx: StageContext) -> dict[str, Any]:
    """Quantize the ONNX model."""
    import onnx

    from pipeline.onnx_utils import (
        EXTERNAL_DATA_FILE,
        MODEL_FILE,
        copy_metadata,
        model_file,
        open_session,
        parity_grid,
        save_onnx,
    )

    config: QuantizeConfig = ctx.config
    if ctx.recipe.model.task == "text-generation":
        return _quantize_decoder(ctx, config)
    source = model_file(ctx.input_dir)
    graph_nodes = _graph_nodes(source)
    missing = [name for name in config.nodes_to_exclude if name not in graph_nodes]
    if missing:
        raise InputError(
            f"quantize.nodes_to_exclude: {len(missing)} node(s) not in {source}: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    vocab_size = _vocab_size(ctx.input_dir)  # for the parity inputs; read first to fail fast
    # Scratch files need external data where the protobuf limit would be hit.
    external = _size(ctx.input_dir) > _PROTO_LIMIT or any(
        p.name.startswith(MODEL_FILE) and p.name != MODEL_FILE for p in ctx.input_dir.iterdir()
    )

    metrics: dict[str, Any] = {"mode": config.mode}
    with tempfile.TemporaryDirectory(prefix="quantize-") as scratch:
        work = Path(scratch)
        # Quantizers write into scratch space; the result is re-saved through save_onnx so the
        # external-data convention (model.onnx.data above the threshold) holds for every stage.
        written = work / MODEL_FILE
        if config.mode == "weight_only_int4":
            metrics.update(_int4(config, source, written, external))
        else:
            metrics.update(_int8(ctx, config, source, written, external, graph_nodes, work))
        target = save_onnx(onnx.load(str(written)), ctx.output_dir)
    copy_metadata(ctx.input_dir, ctx.output_dir)
    counts = _count_ops(target)
    _check_quantized(config, counts, target)

    # Parity against the fp32 input (the export, or the fused model that was itself proven equal
    # to the export): max |diff| reported, argmax agreement enforced.
    reference = open_session(source)
    ref_names = [o.name for o in reference.get_outputs()]
    session = open_session(target)
    parity = parity_grid(
        lambda feeds: reference.run(ref_names, feeds),
        session,
        ctx.recipe.export.parity.shapes,
        config.parity_atol if config.parity_atol is not None else math.inf,
        vocab_size,
        label=f"quantized model ({config.mode}) {target}",
        min_argmax_agreement=_min_agreement(config, ctx.recipe.model.task),
        min_cosine_mean=_min_cosine_mean(config, ctx.recipe.model.task),
        raise_on_atol=config.parity_atol is not None,
    )
    if parity["atol"] == math.inf:
        parity["atol"] = None
    input_bytes, output_bytes = _size(ctx.input_dir), _size(ctx.output_dir)
    metrics.update(
        {
            "quantized_ops": counts,
            "parity": parity,
            "size_bytes": output_bytes,
            "input_size_bytes": input_bytes,
            "size_ratio": round(output_bytes / input_bytes, 4) if input_bytes else None,
            "external_data": (ctx.output_dir / EXTERNAL_DATA_FILE).exists(),
        }
    )
    ctx.log.info(
        "quantize %s: %d -> %d bytes, parity max|diff| %.3g, argmax agreement %.3f",
        config.mode,
        input_bytes,
        output_bytes,
        parity["max_abs_diff"],
        parity["argmax_agreement"],
    )
    return metrics


def _int8(
    ctx: StageContext,
    config: QuantizeConfig,
    source: Path,
    target: Path,
    external: bool,
    graph_nodes: dict[str, str],
    work: Path,
) -> dict[str, Any]:
    """Dynamic or static INT8, with optional automatic exclusion of sensitive nodes."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from pipeline.quantization.calibration import calibration_feeds, make_reader
    from pipeline.quantization.types import default_int8_types

    defaults = default_int8_types(ctx.machine)
    static = config.mode == "static"
    weight_type = config.weight_type if config.weight_type != "auto" else "QInt8"
    activation_type = (
        (config.activation_type if config.activation_type != "auto" else defaults["activation_type"])
        if static
        else "QUInt8"  # DynamicQuantizeLinear always produces uint8
    )
    reduce_range = config.reduce_range if config.reduce_range is not None else defaults["reduce_range"]
    op_types = config.op_types or (["MatMul", "Gemm"] if static else None)
    # Fused graphs hold com.microsoft ops that ONNX type inference cannot see through: without a
    # default type, quantize_dynamic fails with "Unable to find data type for weight_name=...".
    extra: dict[str, Any] = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    if config.matmul_const_b_only is not None:
        extra["MatMulConstBOnly"] = config.matmul_const_b_only
    if static:
        # Collect one example at a time: histogram calibrators need one tensor shape per
        # collection, and it keeps MinMax from holding every intermediate tensor in memory.
        extra["CalibStridedMinMax"] = 1
    if static and config.calibration == "Percentile":
        extra["CalibPercentile"] = config.percentile

    settings: dict[str, Any] = {
        "weight_type": weight_type,
        "activation_type": activation_type,
        "reduce_range": reduce_range,
        "per_channel": config.per_channel,
        "op_types": op_types,
        "type_defaults": defaults,
        "matmul_const_b_only": extra.get("MatMulConstBOnly", not static),
    }

    if static:
        feeds, n_examples = calibration_feeds(ctx, source)
        reader = make_reader(feeds)
        quant_source = _with_symbolic_shapes(source, work, external)
        cache = work / "calibration_ranges.json"
        settings.update(
            {"format": config.format, "calibration": config.calibration, "calibration_examples": n_examples}
        )
        if config.calibration == "Percentile":
            settings["percentile"] = config.percentile

        def quantize_fn(
            out: Path, nodes_to_quantize: list[str] | None, nodes_to_exclude: list[str] | None
        ) -> Path:
            reader.rewind()
            return _run_quantizer(
                ctx,
                f"quantize (static, {config.calibration})",
                quantize_static,
                str(quant_source),
                str(out),
                calibration_data_reader=reader,
                quant_format=getattr(QuantFormat, config.format),
                op_types_to_quantize=op_types,
                per_channel=config.per_channel,
                reduce_range=reduce_range,
                activation_type=getattr(QuantType, activation_type),
                weight_type=getattr(QuantType, weight_type),
                nodes_to_quantize=nodes_to_quantize,
                nodes_to_exclude=nodes_to_exclude,
                use_external_data_format=external and out == target,
                calibrate_method=getattr(CalibrationMethod, config.calibration),
                extra_options=dict(extra),
                calibration_cache_path=cache,  # calibrate once, reuse for every ablation
            )

    else:
        feeds = None

        def quantize_fn(
            out: Path, nodes_to_quantize: list[str] | None, nodes_to_exclude: list[str] | None
        ) -> Path:
            return _run_quantizer(
                ctx,
                "quantize (dynamic)",
                quantize_dynamic,
                str(source),
                str(out),
                op_types_to_quantize=op_types,
                per_channel=config.per_channel,
                reduce_range=reduce_range,
                weight_type=getattr(QuantType, weight_type),
                nodes_to_quantize=nodes_to_quantize,
                nodes_to_exclude=nodes_to_exclude,
                use_external_data_format=external and out == target,
                extra_options=dict(extra),
            )

    excluded = list(config.nodes_to_exclude)
    auto = None
    if config.auto_exclude is not None:
        if feeds is None:
            feeds, n_examples = calibration_feeds(ctx, source)
            settings["calibration_examples"] = n_examples
        auto = _auto_exclude(config, source, quantize_fn, feeds, graph_nodes, op_types, work)
        excluded += auto["excluded"]
    quantize_fn(target, None, excluded or None)
    return {"settings": settings, "nodes_excluded": excluded, "auto_exclusion": auto}


def _auto_exclude(
    config: QuantizeConfig,
    source: Path,
    quantize_fn: Any,
    feeds: list[dict[str, Any]],
    graph_nodes: dict[str, str],
    op_types: list[str] | None,
    work: Path,
) -> dict[str, Any]:
    """Rank candidate nodes by sensitivity on calibration data and exclude the worst."""
    import time

    from pipeline.quantization.sensitivity import (
        measure_quantized,
        rank_nodes,
        run_feeds,
        select_exclusions,
        target_met,
    )

    auto = config.auto_exclude
    assert auto is not None
    wanted = set(op_types or ("MatMul", "Gemm", "Attention"))
    candidates = [
        name for name, op in graph_nodes.items() if op in wanted and name not in config.nodes_to_exclude
    ]
    if not candidates:
        raise InputError(f"quantize.auto_exclude: no {sorted(wanted)} nodes to rank in {source}")
    started = time.perf_counter()
    sample = feeds[: auto.samples]
    reference = run_feeds(source, sample)
    before = measure_quantized(quantize_fn, sample, reference, work, config.nodes_to_exclude, "none")
    if auto.min_sqnr_db is not None or auto.min_argmax_agreement is not None:
        if target_met(before, auto.min_sqnr_db, auto.min_argmax_agreement):
            # Nothing to exclude: skip the per-node ranking altogether.
            ranking: list[dict[str, Any]] = []
            chosen = {"excluded": [], "before": before, "after": before, "steps": [], "target_met": True}
            return _auto_report(ranking, chosen, len(sample), len(candidates), started)
    ranking = rank_nodes(candidates, quantize_fn, sample, reference, work)
    # Nodes that the quantizer skipped anyway (e.g. MatMuls without a constant weight in dynamic
    # mode) come out exact: they cannot be worth a slot in the budget.
    ranking_useful = [item for item in ranking if item["max_abs_diff"] > 0.0]
    chosen = select_exclusions(
        ranking_useful,
        quantize_fn,
        sample,
        reference,
        work,
        before=before,
        base_exclude=config.nodes_to_exclude,
        max_nodes=auto.max_nodes,
        min_sqnr_db=auto.min_sqnr_db,
        min_argmax_agreement=auto.min_argmax_agreement,
    )
    return _auto_report(ranking, chosen, len(sample), len(candidates), started)


def _auto_report(
    ranking: list[dict[str, Any]], chosen: dict[str, Any], samples: int, candidates: int, started: float
) -> dict[str, Any]:
    import time

    return {
        "method": "per-node ablation: each candidate quantized alone, output SQNR vs fp32",
        "samples": samples,
        "candidates": candidates,
        "ranking": ranking[:10],
        **chosen,
        "duration_s": round(time.perf_counter() - started, 2),
    }


def _int4(config: QuantizeConfig, source: Path, target: Path, external: bool) -> dict[str, Any]:
    """Weight-only INT4 (MatMulNBits): every MatMul with a constant 2-D weight."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    op_types = tuple(config.op_types or ["MatMul"])
    try:
        model = onnx.load(str(source))
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=4,
            block_size=config.block_size,
            is_symmetric=config.int4_symmetric,
            accuracy_level=config.accuracy_level,
            nodes_to_exclude=list(config.nodes_to_exclude),
            op_types_to_quantize=op_types,
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=external)
    except Exception as err:
        raise StageError(f"quantize (weight_only_int4): {_first_line(err)}") from None
    return {
        "settings": {
            "bits": 4,
            "block_size": config.block_size,
            "accuracy_level": config.accuracy_level,
            "symmetric": config.int4_symmetric,
            "op_types": list(op_types),
        },
        "nodes_excluded": list(config.nodes_to_exclude),
        "auto_exclusion": None,
    }


def _check_quantized(config: QuantizeConfig, counts: dict[str, int], target: Path) -> None:
    """A quantizer that quietly quantized nothing (types not inferred, no matching ops) fails."""
    if config.mode == "weight_only_int4":
        done = counts["MatMulNBits"]
    elif config.mode == "dynamic":
        done = counts["MatMulInteger"] + counts["QAttention"] + counts["DynamicQuantizeMatMul"]
    elif config.format == "QDQ":
        done = counts["QuantizeLinear"]
    else:
        done = counts["QLinearMatMul"] + counts["QGemm"] + counts["QAttention"]
    if not done:
        raise StageError(
            f"quantize ({config.mode}): no operator was quantized in {target} "
            f"(op counts {', '.join(f'{k}={v}' for k, v in counts.items() if v)}); check op_types"
        )


def _run_quantizer(ctx: StageContext, label: str, fn: Any, source: str, out: str, **kwargs: Any) -> Path:
    """Call an ONNX Runtime quantizer quietly; any failure becomes a one-line StageError."""
    try:
        with _quiet_ort(ctx.log):
            fn(source, out, **kwargs)
    except Exception as err:
        raise StageError(f"{label} failed on {source}: {_first_line(err)}") from None
    return Path(out)


@contextlib.contextmanager
def _quiet_ort(log: Any) -> Iterator[None]:
    """ONNX Runtime's quantizers print progress to stdout and warn about pre-processing (which
    DESIGN.md §7 found useless here) on the root logger: send the prints to our debug log instead."""
    captured = io.StringIO()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        root.setLevel(level)
        for line in captured.getvalue().splitlines():
            if line.strip():
                log.debug("onnxruntime: %s", line.strip())


def _with_symbolic_shapes(source: Path, work: Path, external: bool) -> Path:
    """`source`, or a scratch copy with ORT's symbolic shape inference when it has fused
    (com.microsoft) ops: ONNX's own inference cannot type their outputs, and the calibrator then
    silently skips those tensors (static QDQ left the activations in float; QOperator crashed)."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(source))
    if not any(node.domain == "com.microsoft" for node in model.graph.node):
        return source
    try:
        # auto_merge: BERT exports need it (DESIGN.md §7: quant_pre_process fails without it).
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as err:
        raise StageError(
            f"quantize: symbolic shape inference failed on fused model {source}: {_first_line(err)}"
        ) from None
    path = work / "shaped.onnx"
    onnx.save_model(inferred, str(path), save_as_external_data=external, location="shaped.onnx.data")
    return path


def _graph_nodes(path: Path) -> dict[str, str]:
    """{node name: op type} of the main graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {node.name: node.op_type for node in model.graph.node if node.name}


def _count_ops(path: Path) -> dict[str, int]:
    from pipeline.onnx_utils import count_ops

    return count_ops(path, QUANT_OPS)


def _vocab_size(folder: Path) -> int:
    path = Path(folder) / "config.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError) as err:
        raise InputError(
            f"{path}: cannot read vocab_size for the parity inputs: {_first_line(err)}"
        ) from None
    if not isinstance(value, int) or value <= 0:
        raise InputError(f"{path}: vocab_size must be a positive integer, got {value!r}")
    return value


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.name.startswith("model.onnx"))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _quantize_decoder(ctx: StageContext, config: QuantizeConfig) -> dict[str, Any]:
    """Decoders: dynamic INT8 or INT4 weight-only (LM head and embedding kept fp32, as measured)."""
    from pipeline.decoder.quantize import quantize_decoder
    from pipeline.stages.export import decoder_parity

    if config.mode == "static":
        raise InputError("quantize.mode: static is not supported for text-generation models")
    # The parity grid feeds random past values; decoder quality is gated by perplexity and greedy
    # agreement in validate, so no argmax floor here.
    common = {"parity": decoder_parity(ctx.recipe.export), "min_argmax_agreement": None}
    if config.mode == "dynamic":
        return quantize_decoder(
            ctx.input_dir,
            ctx.output_dir,
            "int8",
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            **common,
        )
    return quantize_decoder(
        ctx.input_dir,
        ctx.output_dir,
        "int4",
        config.block_size,
        "rtn",
        False,
        accuracy_level=config.accuracy_level,
        symmetric=config.int4_symmetric,
        **common,
    )
