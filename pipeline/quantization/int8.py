"""INT8 quantization with ONNX Runtime's quantizers: dynamic, and static with calibration data.

`int8_quantizer(...)` returns the settings as applied and a function
`quantize(out, nodes_to_quantize, nodes_to_exclude) -> out` that the quantize stage calls once
for the final model and the sensitivity search (pipeline.quantization.sensitivity) calls per
candidate. Defaults follow what was measured on these library versions (DESIGN.md §7): U8S8 on x86
with VNNI, reduce_range without VNNI (the machine fingerprint decides, pipeline.quantization.types),
and `DefaultTensorType` always set, so fused graphs (com.microsoft ops without type inference)
quantize. Static calibrates once (ranges cached) and reuses the ranges for every ablation.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import StageError, first_line

QuantizeFn = Callable[[Path, "list[str] | None", "list[str] | None"], Path]


def int8_quantizer(
    config: Any,
    source: Path,
    work: Path,
    *,
    op_types: list[str] | None,
    int8_types: dict[str, Any],
    feeds: list[dict[str, Any]] | None,
    external: bool,
    final: Path,
    log: logging.Logger,
) -> tuple[QuantizeFn, dict[str, Any]]:
    """The quantize function and its settings for `config` (a QuantizeConfig, mode dynamic/static).

    `op_types`: what to quantize (the recipe's, else the task's default for the mode). `int8_types`:
    the machine's INT8 type defaults. `feeds`: calibration feeds (static). `final`: the path of the
    real output (only it is written with external data when the model needs it).
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    static = config.mode == "static"
    weight_type = config.weight_type if config.weight_type != "auto" else "QInt8"
    activation_type = (
        (config.activation_type if config.activation_type != "auto" else int8_types["activation_type"])
        if static
        else "QUInt8"  # DynamicQuantizeLinear always produces uint8
    )
    reduce_range = config.reduce_range if config.reduce_range is not None else int8_types["reduce_range"]
    # Fused graphs hold com.microsoft ops that ONNX type inference cannot see through: without a
    # default type, quantize_dynamic fails with "Unable to find data type for weight_name=...".
    extra: dict[str, Any] = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    if config.matmul_const_b_only is not None:
        extra["MatMulConstBOnly"] = config.matmul_const_b_only
    settings: dict[str, Any] = {
        "weight_type": weight_type,
        "activation_type": activation_type,
        "reduce_range": reduce_range,
        "per_channel": config.per_channel,
        "op_types": op_types,
        "type_defaults": int8_types,
        "matmul_const_b_only": extra.get("MatMulConstBOnly", not static),
    }
    if not static:

        def quantize(
            out: Path, nodes_to_quantize: list[str] | None, nodes_to_exclude: list[str] | None
        ) -> Path:
            return run_quantizer(
                "quantize (dynamic)",
                quantize_dynamic,
                source,
                out,
                log,
                op_types_to_quantize=op_types,
                per_channel=config.per_channel,
                reduce_range=reduce_range,
                weight_type=getattr(QuantType, weight_type),
                nodes_to_quantize=nodes_to_quantize,
                nodes_to_exclude=nodes_to_exclude,
                use_external_data_format=external and out == final,
                extra_options=dict(extra),
            )

        return quantize, settings

    from pipeline.quantization.calibration import make_reader

    assert feeds is not None, "static quantization needs calibration feeds"
    # Collect one example at a time: histogram calibrators need one tensor shape per collection,
    # and it keeps MinMax from holding every intermediate tensor in memory.
    extra["CalibStridedMinMax"] = 1
    if config.format == "QDQ" and not config.quantize_matmul_outputs:
        # ORT's QDQ quantizer also quantizes every MatMul's output by default (before the bias and
        # the residual): measured on the default recipe, that alone cost 3 of the 3.5 F1 points lost.
        extra["OpTypesToExcludeOutputQuantization"] = ["MatMul"]
    if config.calibration == "Percentile":
        extra["CalibPercentile"] = config.percentile
    reader = make_reader(feeds)
    quant_source = with_symbolic_shapes(source, work, external)
    cache = work / "calibration_ranges.json"
    settings.update(
        {"format": config.format, "calibration": config.calibration, "calibration_examples": len(feeds)}
    )
    if config.calibration == "Percentile":
        settings["percentile"] = config.percentile

    def quantize_static_fn(
        out: Path, nodes_to_quantize: list[str] | None, nodes_to_exclude: list[str] | None
    ) -> Path:
        reader.rewind()
        written = run_quantizer(
            f"quantize (static, {config.calibration})",
            quantize_static,
            quant_source,
            out,
            log,
            calibration_data_reader=reader,
            quant_format=getattr(QuantFormat, config.format),
            op_types_to_quantize=op_types,
            per_channel=config.per_channel,
            reduce_range=reduce_range,
            activation_type=getattr(QuantType, activation_type),
            weight_type=getattr(QuantType, weight_type),
            nodes_to_quantize=nodes_to_quantize,
            nodes_to_exclude=nodes_to_exclude,
            use_external_data_format=external and out == final,
            calibrate_method=getattr(CalibrationMethod, config.calibration),
            extra_options=dict(extra),
            calibration_cache_path=cache,  # calibrate once, reuse for every ablation
        )
        if fold:
            settings["integer_ops"] = fold_qdq_file(written, external and out == final)
        if config.excluded_as == "dynamic" and nodes_to_exclude:
            dynamic_for_excluded(written, nodes_to_exclude, external and out == final)
        return written

    def dynamic_for_excluded(path: Path, nodes: list[str], external_data: bool) -> None:
        """The float MatMul/Gemm nodes static INT8 left out become dynamic INT8, in place."""
        staged = path.with_name(f"dynamic-{path.name}")
        run_quantizer(
            "quantize (dynamic, excluded nodes)",
            quantize_dynamic,
            path,
            staged,
            log,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=config.per_channel,
            reduce_range=reduce_range,
            weight_type=getattr(QuantType, weight_type),
            nodes_to_quantize=nodes,
            use_external_data_format=external_data,
            extra_options=dict(extra),
        )
        if external_data:
            # The dynamic quantizer names its data file after its own output: written again as path's.
            save_in_place(onnx.load(str(staged)), path, external=True)
            for written_file in path.parent.glob(f"{staged.name}*"):
                written_file.unlink()
        else:
            staged.replace(path)

    # Every candidate of an exclusion search is folded too: it is judged in the form it ships in.
    fold = config.format == "QDQ" and config.integer_ops
    settings["integer_ops"] = None
    return quantize_static_fn, settings


def fold_qdq_file(path: Path, external: bool) -> dict[str, int]:
    """`fold_qdq` (pipeline.quantization.qdq) applied to the model file at `path`, in place."""
    import onnx

    from pipeline.quantization.qdq import fold_qdq

    model = onnx.load(str(path))
    changes = fold_qdq(model)
    save_in_place(model, path, external=external)
    return changes


def save_in_place(model: Any, path: Path, *, external: bool) -> None:
    """Write `model` over `path`, its weights in `path`.data beside it when `external`."""
    import onnx

    data = path.with_name(f"{path.name}.data")
    data.unlink(missing_ok=True)  # onnx.save_model would append to a stale one
    onnx.save_model(model, str(path), save_as_external_data=external, location=data.name)


def run_quantizer(label: str, fn: Any, source: Path, out: Path, log: logging.Logger, **kwargs: Any) -> Path:
    """Call an ONNX Runtime quantizer quietly; any failure becomes a one-line StageError."""
    try:
        with quiet_ort(log):
            fn(str(source), str(out), **kwargs)
    except Exception as err:
        raise StageError(f"{label} failed on {source}: {first_line(err)}") from None
    return Path(out)


@contextlib.contextmanager
def quiet_ort(log: logging.Logger) -> Iterator[None]:
    """ONNX Runtime's quantizers print progress to stdout and warn about pre-processing (which
    DESIGN.md §7 found useless here) on the root logger: send the prints to our debug log instead."""
    import warnings

    captured = io.StringIO()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(captured), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
        for line in captured.getvalue().splitlines():
            if line.strip():
                log.debug("onnxruntime: %s", line.strip())


def with_symbolic_shapes(source: Path, work: Path, external: bool) -> Path:
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
            f"quantize: symbolic shape inference failed on fused model {source}: {first_line(err)}"
        ) from None
    path = work / "shaped.onnx"
    onnx.save_model(inferred, str(path), save_as_external_data=external, location="shaped.onnx.data")
    return path


def activation_matmuls(path: Path) -> list[str]:
    """MatMul nodes whose second input is not a constant weight (attention scores x values)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [
        n.name for n in model.graph.node if n.op_type == "MatMul" and n.name and n.input[1] not in constants
    ]
