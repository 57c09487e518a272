"""Quantize stage: dynamic INT8, static INT8 with calibration, weight-only INT4, for every task.

A thin adapter over pipeline.quantization: the task supplies its quantization policy (default op
types, nodes kept in float such as a decoder's LM head, graph preparation); the stage quantizes,
then loads the result in ONNX Runtime and compares it with its fp32 input on the recipe's parity
grid (max |diff|, argmax agreement and cosine reported; floors enforced only where the recipe sets
them: random inputs are a correctness check, not a quality measure). When the recipe has a tune
split, the task's headline metric of the input and of the quantized model on it go into the
manifest, and automatic exclusion is decided on it. Sizes and quantized-op counts too.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config.quantize import WEIGHT_ONLY, QuantizeConfig
from pipeline.errors import InputError
from pipeline.stages.registry import StageContext, stage


def _splits_read(config: QuantizeConfig) -> tuple[str, ...]:
    """Calibration data is read by static quantization and GPTQ only (a dynamic or RTN variant does
    not re-run when it changes); the tune split, when the recipe has one, scores every result."""
    return ("calibration", "tune") if config.reads_calibration() else ("tune",)


def _sections_read(config: QuantizeConfig) -> tuple[str, ...]:
    """The parity grid; the gates when automatic exclusion takes its target from them."""
    auto = config.auto_exclude
    return (
        ("export.parity", "gates")
        if auto is not None and auto.max_metric_drop is None
        else ("export.parity",)
    )


def _machine_facts(config: QuantizeConfig, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """INT8 types follow the CPU (VNNI or not): an exported/ folder moved to another kind of CPU
    re-runs INT8 quantization; INT4 does not depend on the machine."""
    from pipeline.quantization.types import default_int8_types

    return {} if config.mode in WEIGHT_ONLY else {"int8_types": default_int8_types(fingerprint)}


@stage(
    "quantize",
    config=QuantizeConfig,
    consumes="onnx",
    produces="onnx",
    data_splits=_splits_read,
    sections=_sections_read,
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
    if config.mode == "static" and config.format == "QDQ" and config.matmul_const_b_only:
        from pipeline.quantization.int8 import activation_matmuls

        # ORT's QDQ quantizer ignores MatMulConstBOnly: keep the activation x activation ones by name.
        excluded += [name for name in activation_matmuls(source) if name not in excluded]
    scorer = _tune_scorer(ctx)

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
        if config.mode in WEIGHT_ONLY:
            from pipeline.quantization.nbits import quantize_nbits

            if config.int4_algorithm == "gptq" and not ctx.data.has("calibration"):
                raise InputError(
                    "quantize.int4_algorithm: gptq needs data.calibration (the text its Hessians are "
                    "collected from; disjoint from eval)"
                )

            bits = 4 if config.mode == "weight_only_int4" else 8
            level = config.accuracy_level if config.accuracy_level is not None or bits == 4 else 4
            head = policy.notes.get("lm_head", {}).get("node")
            head_bits = config.lm_head_bits if config.lm_head_bits not in (None, bits) and head else None
            nbits_args = dict(
                block_size=config.block_size,
                symmetric=config.int4_symmetric,
                accuracy_level=level,
                external=external,
                log=ctx.log,
            )
            metrics["settings"] = quantize_nbits(
                prepared,
                written,
                bits=bits,
                algorithm=config.int4_algorithm,
                op_types=op_types or ["MatMul"],
                nodes_to_exclude=[*excluded, head] if head_bits else excluded,
                **nbits_args,
            )
            if head_bits:  # a second pass over the head alone, at its own bits
                others = [n for n, op in graph_nodes(written).items() if op == "MatMul" and n != head]
                with_head = work / "with_head" / MODEL_FILE
                with_head.parent.mkdir()
                quantize_nbits(
                    written,
                    with_head,
                    bits=head_bits,
                    algorithm="rtn",
                    op_types=["MatMul"],
                    nodes_to_exclude=others,
                    **nbits_args,
                )
                written = with_head
            if config.int4_algorithm == "gptq":
                from pipeline.quantization.calibration import calibration_feeds
                from pipeline.quantization.gptq import apply_gptq

                feeds = calibration_feeds(
                    ctx.data.get("calibration"),
                    ctx.input_dir,
                    prepared,
                    ctx.model.max_length,
                    ctx.model.trust_remote_code,
                )
                metrics["settings"]["gptq"] = apply_gptq(
                    written, prepared, feeds, damp=config.gptq_damp, external=external, work=work, log=ctx.log
                )
            metrics["settings"]["lm_head_bits"] = head_bits or (bits if config.quantize_lm_head else None)
            metrics["auto_exclusion"] = None
        else:
            metrics.update(_int8(ctx, prepared, written, work, excluded, op_types, nodes, external, scorer))
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
    parity_metrics = parity_grid(
        session_reference(open_session(source)),
        session,
        ctx.task.parity_cases(session, parity.shapes, vocab, parity.past_lens),
        config.parity_atol if config.parity_atol is not None else math.inf,
        label=f"quantized model ({config.mode}) {target}",
        min_argmax_agreement=config.min_argmax_agreement,
        min_cosine_mean=config.min_cosine_mean,
        raise_on_atol=config.parity_atol is not None,
    )
    if scorer is not None:
        quantized = scorer.score(target)
        metrics["tune"] = {
            "metric_name": scorer.metric_name,
            "examples": len(scorer.evaluator.examples),
            "input": round(scorer.reference_metric, 6),
            "quantized": round(quantized, 6),
            "drop": round(scorer.drop(scorer.reference_metric, quantized), 6),
        }
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


def _tune_scorer(ctx: StageContext) -> Any:
    """The task's metric on the tune split for ONNX models, its fp32 input scored first (None when
    the recipe has no tune split or the task no such scorer)."""
    if not ctx.data.has("tune"):
        return None
    examples = ctx.data.get("tune")
    auto = ctx.config.auto_exclude
    if auto is not None and auto.samples:
        examples = examples[: auto.samples]
    scorer = ctx.task.onnx_scorer(
        ctx.input_dir,
        examples,
        max_length=ctx.model.max_length,
        trust_remote_code=ctx.model.trust_remote_code,
    )
    if scorer is not None:
        from pipeline.onnx.io import model_file

        scorer.score(model_file(ctx.input_dir))  # the fp32 input: the reference
    return scorer


def _int8(
    ctx: StageContext,
    source: Path,
    target: Path,
    work: Path,
    excluded: list[str],
    op_types: list[str] | None,
    nodes: dict[str, str],
    external: bool,
    scorer: Any,
) -> dict[str, Any]:
    """Dynamic or static INT8, with optional automatic exclusion decided on the tune split."""
    from pipeline.quantization.calibration import calibration_feeds
    from pipeline.quantization.int8 import int8_quantizer

    config: QuantizeConfig = ctx.config

    def feeds_of(split: str) -> list[dict[str, Any]]:
        return calibration_feeds(
            ctx.data.get(split), ctx.input_dir, source, ctx.model.max_length, ctx.model.trust_remote_code
        )

    quantize_fn, settings = int8_quantizer(
        config,
        source,
        work,
        op_types=op_types,
        int8_types=ctx.machine["int8_types"],
        feeds=feeds_of("calibration") if config.mode == "static" else None,
        external=external,
        final=target,
        log=ctx.log,
    )
    auto = None
    if config.auto_exclude is not None:
        if not ctx.data.has("tune"):
            raise InputError("quantize.auto_exclude: needs data.tune, the split exclusions are scored on")
        auto = _auto_exclude(
            ctx, source, quantize_fn, feeds_of("tune"), scorer, nodes, op_types, excluded, work
        )
        excluded = [*excluded, *auto["excluded"]]
    quantize_fn(target, None, excluded or None)
    return {"settings": settings, "nodes_excluded": excluded, "auto_exclusion": auto}


def _auto_exclude(
    ctx: StageContext,
    source: Path,
    quantize_fn: Any,
    feeds: list[dict[str, Any]],
    scorer: Any,
    nodes: dict[str, str],
    op_types: list[str] | None,
    excluded: list[str],
    work: Path,
) -> dict[str, Any]:
    """Rank the candidates by input range, then keep them in float one by one until the tune
    metric's drop is within the target."""
    import time

    from pipeline.quantization.exclusion import RANGE_METHOD, greedy_exclusion, input_ranges
    from pipeline.quantization.int8 import activation_matmuls

    config: QuantizeConfig = ctx.config
    auto = config.auto_exclude
    assert auto is not None
    if scorer is None:
        raise InputError(f"quantize.auto_exclude: task {ctx.task.name} has no metric to score exclusions on")
    target = (
        auto.max_metric_drop
        if auto.max_metric_drop is not None
        else ctx.sections["gates"].allowed_drop(scorer.reference_metric)
    )
    started = time.perf_counter()
    wanted = set(op_types or ("MatMul", "Gemm")) - {"Gather"}
    skipped = (
        set(activation_matmuls(source)) if config.mode == "dynamic" or config.matmul_const_b_only else set()
    )
    candidates = [n for n, op in nodes.items() if op in wanted and n not in excluded and n not in skipped]
    if not candidates:
        raise InputError(f"quantize.auto_exclude: no {sorted(wanted)} nodes to rank in {source}")
    ranges = input_ranges(source, feeds, candidates)
    order = sorted(candidates, key=lambda n: (-ranges[n], n))
    chosen = greedy_exclusion(
        order,
        quantize_fn,
        scorer.score,
        lambda metric: scorer.drop(scorer.reference_metric, metric),
        work,
        base_exclude=excluded,
        max_nodes=auto.max_nodes,
        max_drop=target,
    )
    if not chosen["target_met"]:
        ctx.log.warning(
            "quantize.auto_exclude: %s drop %.4f on the tune split is still above the target %.4f after "
            "keeping %d nodes in float (max_nodes)",
            scorer.metric_name,
            chosen["steps"][-1]["drop"],
            target,
            len(chosen["excluded"]),
        )
    return {
        "method": f"rank: {RANGE_METHOD}; decide: {scorer.metric_name} on the tune split, greedy",
        "metric_name": scorer.metric_name,
        "fp32_metric": round(scorer.reference_metric, 6),
        "target_drop": target,
        "tune_examples": len(scorer.evaluator.examples),
        "candidates": len(candidates),
        "ranking": [{"node": n, "input_range": ranges[n]} for n in order[:10]],
        **chosen,
        "note": None
        if chosen["target_met"]
        else f"target not reached: drop {chosen['steps'][-1]['drop']:.4f} > {target:g} "
        f"with {auto.max_nodes} nodes kept in float",
        "duration_s": round(time.perf_counter() - started, 2),
    }
