"""Optimize stage: ONNX Runtime transformer fusions (Attention, SkipLayerNorm, BiasGelu, ...).

The fusion is measured, not assumed: the fused-operator counts go into the manifest beside what a
full fusion of this model would give (Attention = number of layers), and the stage fails when
attention fusion falls short and the recipe requires it (the known breakage after an exporter or
transformers change, DESIGN.md §7-8). The fused model is then proven equal to its unfused input on
the task's parity grid. Measured on this stack for decoders (optimum-onnx 0.1.0, transformers
4.57.6, onnxruntime 1.32.0): GPT-2 fuses FastGelu and SkipLayerNormalization but no attention;
Llama / Qwen2 fuse RotaryEmbedding and SkipSimplifiedLayerNormalization, no attention either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config.optimize import OptimizeConfig
from pipeline.errors import InputError, StageError, first_line
from pipeline.stages.registry import StageContext, stage

# config.json `model_type` -> onnxruntime.transformers optimizer model type. Only families whose
# ONNX exports ORT's fusions are known to handle; anything else is an InputError, never a
# silent pass-through (ORT itself just warns and returns the model unchanged).
MODEL_TYPES: dict[str, str] = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "camembert": "bert",
    "distilbert": "bert",
    "electra": "bert",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    # Llama-style decoders have no model type of their own in ORT 1.32's optimizer; "gpt2" gives
    # them its generic fusions (RMSNorm, rotary).
    "llama": "gpt2",
    "mistral": "gpt2",
    "qwen2": "gpt2",
    "qwen3": "qwen3",
    "phi": "gpt2",
}

# Encoder families where a full fusion is also one EmbedLayerNorm, 2 SkipLayerNorms and one Gelu
# per layer (reported; only attention is enforced).
_ENCODERS = {"bert"}

# Fused operators recorded in the manifest (ORT's own statistics come on top of these).
FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "GroupQueryAttention",
    "EmbedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "GemmFastGelu",
    "RotaryEmbedding",
)
ATTENTION_OPS = (
    "Attention",
    "MultiHeadAttention",
    "GroupQueryAttention",
    "PackedAttention",
    "QOrderedAttention",
)


@stage("optimize", config=OptimizeConfig, consumes="onnx", produces="onnx", sections=("export.parity",))
def optimize(ctx: StageContext) -> dict[str, Any]:
    """Fuse the graph with ONNX Runtime's transformer optimizer."""
    import contextlib
    import io
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    from pipeline.onnx.io import (
        EXTERNAL_DATA_FILE,
        copy_metadata,
        count_ops,
        model_bytes,
        model_file,
        read_config,
        save_onnx,
    )
    from pipeline.onnx.parity import parity_grid, session_reference
    from pipeline.onnx.session import CPU, open_session

    config: OptimizeConfig = ctx.config
    source = model_file(ctx.input_dir)
    arch = read_architecture(ctx.input_dir, config.model_type)
    provider = _fp16_provider() if config.fp16 else CPU
    opt_level = config.opt_level if config.opt_level is not None else ctx.task.fusion_opt_level
    ctx.log.info(
        "optimize: model_type=%s (ORT %s), heads=%s, hidden=%s, layers=%s",
        arch["model_type"],
        arch["ort_model_type"],
        arch["num_heads"],
        arch["hidden_size"],
        arch["num_layers"],
    )
    ort_logger = logging.getLogger("onnxruntime.transformers")
    level = ort_logger.level
    ort_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            optimizer = optimize_model(
                str(source),
                model_type=arch["ort_model_type"],
                num_heads=arch["num_heads"],
                hidden_size=arch["hidden_size"],
                opt_level=opt_level,
                use_gpu=config.fp16,
            )
    except Exception as err:  # ORT's optimizer raises bare asserts/ValueErrors on odd graphs
        raise StageError(
            f"optimize: ONNX Runtime's optimizer failed on {source}: {first_line(err)}"
        ) from None
    finally:
        ort_logger.setLevel(level)

    ort_stats = {k: int(v) for k, v in optimizer.get_fused_operator_statistics().items()}
    # The task's own attention fusion where ORT has none (decoders: GroupQueryAttention).
    attention_rewrite = ctx.task.fuse_attention(
        optimizer.model, read_config(ctx.input_dir), config.group_query_attention, config.rotary_in_attention
    )
    # Read before saving: a rewrite that changes the cache format changes what parity compares.
    reference = ctx.task.fused_reference(optimizer.model, session_reference(open_session(source)))
    if attention_rewrite["applied"]:
        ctx.log.info(
            "optimize: GroupQueryAttention in %d layers, %d -> %d nodes",
            attention_rewrite["GroupQueryAttention"],
            attention_rewrite["nodes_before"],
            attention_rewrite["nodes_after"],
        )
    fused = count_ops(optimizer.model, FUSED_OPS)
    attention = sum(count_ops(optimizer.model, ATTENTION_OPS).values())
    expected = expected_fusion(arch)
    verdict = "full" if attention >= expected["Attention"] else ("partial" if attention else "not available")
    note = (
        None
        if verdict == "full"
        else f"ONNX Runtime fused {attention} attention node(s) for {expected['Attention']} layers of this "
        f"{arch['model_type']} export (model type {arch['ort_model_type']}): attention fusion "
        + ("is partial" if attention else "is not available for this architecture/exporter")
        + ("" if attention_rewrite["applied"] else f"; the task's own rewrite: {attention_rewrite['reason']}")
    )
    if verdict != "full" and config.require_attention_fusion:
        raise StageError(
            f"optimize: attention fusion fell short: {attention} fused attention nodes, expected "
            f"{expected['Attention']} (one per layer) for {arch['model_type']} from {source}; the export "
            "is not in a form ORT fuses (e.g. torch.onnx dynamo export, new attention code). "
            "Set require_attention_fusion: false to accept it"
        )
    fully_optimized = (
        bool(optimizer.is_fully_optimized()) if hasattr(optimizer, "is_fully_optimized") else None
    )
    if config.fp16:
        kwargs: dict[str, Any] = {"keep_io_types": True}
        if config.fp16_op_block_list is not None:
            kwargs["op_block_list"] = config.fp16_op_block_list
        optimizer.convert_float_to_float16(**kwargs)

    target = save_onnx(optimizer.model, ctx.output_dir)
    copy_metadata(ctx.input_dir, ctx.output_dir)

    parity = ctx.sections["export.parity"]
    # A deep model's fused kernels round differently: never stricter than the export's own grid.
    atol = config.parity_atol or (5e-2 if config.fp16 else max(1e-3, parity.atol))
    session = open_session(target, provider)
    if config.fp16 and session.get_providers()[0] != "CUDAExecutionProvider":
        raise StageError(f"optimize.fp16: the fp16 model runs on {session.get_providers()[0]}, not CUDA")
    parity_metrics = parity_grid(
        reference,
        session,
        ctx.task.parity_cases(session, parity.shapes, arch["vocab_size"], parity.past_lens),
        atol,
        label=f"fused model {target}",
    )
    return {
        "model_type": arch["model_type"],
        "ort_model_type": arch["ort_model_type"],
        "num_heads": arch["num_heads"],
        "hidden_size": arch["hidden_size"],
        "num_layers": arch["num_layers"],
        "opt_level": opt_level,
        "fp16": config.fp16,
        "fused_ops": fused,
        "ort_fused_operator_statistics": ort_stats,
        "attention_rewrite": attention_rewrite,
        "attention_fused": attention,
        "expected_fusion": expected,
        "attention_fusion_complete": attention >= expected["Attention"],
        "attention_fusion": verdict,
        "note": note,
        "fully_optimized": fully_optimized,
        "parity": parity_metrics,
        "size_bytes": model_bytes(ctx.output_dir),
        "external_data": (ctx.output_dir / EXTERNAL_DATA_FILE).exists(),
    }


def read_architecture(folder: Path, override: str | None = None) -> dict[str, Any]:
    """Model type, heads, attention width, layers and vocab size from `folder/config.json`.

    Pruned heads (`config.pruned_heads`, {layer: [heads]}) reduce the heads of their layer; ORT
    needs one (heads, hidden) pair, so non-uniform pruning passes 0/0 and lets ORT read each
    layer's shape from the graph. `hidden_size` is the attention width (heads x head size), which is
    what ORT's fusion calls hidden size (smaller than the model's width after head pruning).
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise InputError(f"{folder}: no config.json beside the ONNX model (needed to pick the fusions)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable JSON config: {first_line(err)}") from None
    model_type = raw.get("model_type")
    if override is None and model_type not in MODEL_TYPES:
        raise InputError(
            f"{path}: model_type {model_type!r} is not supported by the optimize stage; supported: "
            f"{', '.join(sorted(MODEL_TYPES))} (or set optimize.model_type explicitly)"
        )
    ort_type = override or MODEL_TYPES[model_type]

    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"{path}: transformers cannot read this config: {first_line(err)}") from None
    heads = getattr(hf_config, "num_attention_heads", None)
    hidden = getattr(hf_config, "hidden_size", None)
    layers = getattr(hf_config, "num_hidden_layers", None)
    for name, value in (
        ("num_attention_heads", heads),
        ("hidden_size", hidden),
        ("num_hidden_layers", layers),
    ):
        if not isinstance(value, int) or value <= 0:
            raise InputError(f"{path}: {name} must be a positive integer, got {value!r}")
    if hidden % heads:
        raise InputError(f"{path}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    vocab = getattr(hf_config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0:
        raise InputError(f"{path}: vocab_size must be a positive integer (parity inputs), got {vocab!r}")
    head_size = getattr(hf_config, "head_dim", None) or hidden // heads
    pruned = {int(k): set(v) for k, v in (getattr(hf_config, "pruned_heads", None) or {}).items()}
    per_layer = [heads - len(pruned.get(layer, ())) for layer in range(layers)]
    if len(set(per_layer)) == 1:
        num_heads, attn_hidden = per_layer[0], per_layer[0] * head_size
    else:
        num_heads, attn_hidden = 0, 0  # let ORT detect each layer's heads from the graph
    return {
        "model_type": model_type,
        "ort_model_type": ort_type,
        "num_heads": num_heads,
        "hidden_size": attn_hidden,
        "model_hidden_size": hidden,
        "num_layers": layers,
        "heads_per_layer": per_layer,
        "vocab_size": vocab,
    }


def expected_fusion(arch: dict[str, Any]) -> dict[str, int]:
    """What a full fusion of this model gives (Attention = layers that still have heads)."""
    layers_with_attention = sum(1 for h in arch["heads_per_layer"] if h > 0)
    expected = {"Attention": layers_with_attention}
    if arch["ort_model_type"] in _ENCODERS:
        expected.update(
            {
                "EmbedLayerNormalization": 1,
                "SkipLayerNormalization": 2 * arch["num_layers"],
                "Gelu (BiasGelu/FastGelu/Gelu)": arch["num_layers"],
            }
        )
    return expected


def _fp16_provider() -> str:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise InputError(
            "optimize.fp16: fp16 is GPU-only and this ONNX Runtime has no CUDAExecutionProvider "
            "(install onnxruntime-gpu on a machine with a GPU, or drop fp16)"
        )
    return "CUDAExecutionProvider"
