"""Quantize stage: dynamic INT8, static INT8 with calibration, weight-only INT4, for every task.

A thin adapter over pipeline.quantization: the task supplies its quantization policy (default op
types, nodes kept in float such as a decoder's LM head, graph preparation, fidelity floors); the
stage quantizes, then loads the result in ONNX Runtime and compares it with its fp32 input on the
recipe's parity grid (max |diff| reported; argmax agreement / cosine floors enforced where the
task or the recipe sets them). Sizes and quantized-op counts go into the manifest.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config.quantize import QuantizeConfig
from pipeline.errors import InputError
from pipeline.stages.registry import StageContext, stage


def _splits_read(config: QuantizeConfig) -> tuple[str, ...]:
    """Calibration data is read by static quantization and by the sensitivity analysis only: a
    dynamic or INT4 variant does not re-run when the calibration split changes."""
    return ("calibration",) if config.mode == "static" or config.auto_exclude is not None else ()


def _machine_facts(config: QuantizeConfig, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """INT8 types follow the CPU (VNNI or not): an exported/ folder moved to another kind of CPU
    re-runs INT8 quantization; INT4 does not depend on the machine."""
    from pipeline.quantization.types import default_int8_types

    return {} if config.mode == "weight_only_int4" else {"int8_types": default_int8_types(fingerprint)}


@stage(
    "quantize",
    config=QuantizeConfig,
    consumes="onnx",
    produces="onnx",
    data_splits=_splits_read,
    sections=("export.parity",),
    machine_facts=_machine_facts,
)
def quantize(ctx: StageContext) -> dict[str, Any]:
    """Quantize the ONNX model."""
    import onnx

    from pipeline.model_source import random_weights
    from pipeline.onnx.io import (
        EXTERNAL_DATA_FILE,
        MODEL_FILE,
        copy_metadata,
        graph_nodes,
        has_external_data,
        model_bytes,
        model_file,
        save_onnx,
        vocab_size,
    )
    from pipeline.onnx.parity import parity_grid, session_reference
    from pipeline.onnx.session import open_session
    from pipeline.quantization.ops import check_quantized, quantized_ops

    config: QuantizeConfig = ctx.config
    source = model_file(ctx.input_dir)
    nodes = graph_nodes(source)
    missing = [name for name in config.nodes_to_exclude if name not in nodes]
    if missing:
        raise InputError(
            f"quantize.nodes_to_exclude: {len(missing)} node(s) not in {source}: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    vocab = vocab_size(ctx.input_dir)  # for the parity inputs; read first to fail fast
    external = has_external_data(ctx.input_dir)
    policy = ctx.task.quantization_policy(onnx.load(str(source), load_external_data=False), config)
    excluded = list(dict.fromkeys([*policy.keep_float, *config.nodes_to_exclude]))
    op_types = config.op_types or policy.op_types.get(config.mode)

    metrics: dict[str, Any] = {"mode": config.mode, **policy.notes}
    with tempfile.TemporaryDirectory(prefix="quantize-") as scratch:
        work = Path(scratch)
        prepared = source
        if policy.prepare is not None:  # graph surgery asked for by the task (e.g. untie the LM head)
            model = onnx.load(str(source), load_external_data=True)
            policy.prepare(model)
            prepared = work / "prepared.onnx"
            onnx.save_model(
                model, str(prepared), save_as_external_data=external, location="prepared.onnx.data"
            )
        # Quantizers write into scratch space; the result is re-saved through save_onnx so the
        # external-data convention (model.onnx.data above the threshold) holds for every stage.
        written = work / MODEL_FILE
        if config.mode == "weight_only_int4":
            from pipeline.quantization.int4 import quantize_int4

            metrics["settings"] = quantize_int4(
                prepared,
                written,
                block_size=config.block_size,
                symmetric=config.int4_symmetric,
                accuracy_level=config.accuracy_level,
                algorithm=config.int4_algorithm,
                op_types=op_types or ["MatMul"],
                nodes_to_exclude=excluded,
                external=external,
                log=ctx.log,
            )
            metrics["auto_exclusion"] = None
        else:
            metrics.update(_int8(ctx, prepared, written, work, excluded, op_types, nodes, external))
        metrics["nodes_excluded"] = metrics.pop("nodes_excluded", excluded)
        metrics["settings"]["nodes_excluded"] = metrics["nodes_excluded"]
        target = save_onnx(onnx.load(str(written)), ctx.output_dir)
    copy_metadata(ctx.input_dir, ctx.output_dir)
    counts = quantized_ops(target)
    check_quantized(config, counts, target)

    # Parity against the fp32 input (the export, or the fused model that was itself proven equal
    # to the export): max |diff| reported, the task's fidelity floors enforced.
    session = open_session(target)
    parity = ctx.sections["export.parity"]
    min_agreement = config.min_argmax_agreement
    min_cosine = config.min_cosine_mean
    parity_metrics = parity_grid(
        session_reference(open_session(source)),
        session,
        ctx.task.parity_cases(session, parity.shapes, vocab, parity.past_lens),
        config.parity_atol if config.parity_atol is not None else math.inf,
        label=f"quantized model ({config.mode}) {target}",
        min_argmax_agreement=min_agreement if min_agreement is not None else policy.min_argmax_agreement,
        min_cosine_mean=min_cosine if min_cosine is not None else policy.min_cosine_mean,
        raise_on_atol=config.parity_atol is not None,
    )
    input_bytes, output_bytes = model_bytes(ctx.input_dir), model_bytes(ctx.output_dir)
    metrics.update(
        {
            "quantized_ops": counts,
            "parity": parity_metrics,
            "random_weights": random_weights(ctx.input_dir),
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
        parity_metrics["max_abs_diff"],
        parity_metrics["argmax_agreement"],
    )
    return metrics


def _int8(
    ctx: StageContext,
    source: Path,
    target: Path,
    work: Path,
    excluded: list[str],
    op_types: list[str] | None,
    nodes: dict[str, str],
    external: bool,
) -> dict[str, Any]:
    """Dynamic or static INT8, with optional automatic exclusion of sensitive nodes."""
    from pipeline.quantization.calibration import calibration_feeds
    from pipeline.quantization.int8 import int8_quantizer
    from pipeline.quantization.sensitivity import auto_exclude

    config: QuantizeConfig = ctx.config
    feeds = None
    if config.mode == "static" or config.auto_exclude is not None:
        feeds = calibration_feeds(
            ctx.data.get("calibration"),
            ctx.input_dir,
            source,
            ctx.model.max_length,
            ctx.model.trust_remote_code,
        )
    quantize_fn, settings = int8_quantizer(
        config,
        source,
        work,
        op_types=op_types,
        int8_types=ctx.machine["int8_types"],
        feeds=feeds,
        external=external,
        final=target,
        log=ctx.log,
    )
    if feeds is not None:
        settings["calibration_examples"] = len(feeds)
    auto = None
    if config.auto_exclude is not None:
        assert feeds is not None
        auto = auto_exclude(config, source, quantize_fn, feeds, nodes, op_types, work, excluded)
        excluded = [*excluded, *auto["excluded"]]
    quantize_fn(target, None, excluded or None)
    return {"settings": settings, "nodes_excluded": excluded, "auto_exclusion": auto}
