"""Where the prunable pieces of each supported architecture live.

Pruning needs, per transformer block, the attention projections (Q, K, V, output), the FFN up and
down projections, and the module that implements Hugging Face's `prune_heads`. This module maps a
loaded model to that description, or refuses it with an `InputError` naming its `model_type`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import InputError

if TYPE_CHECKING:
    from torch import nn

# model_type -> how its blocks are laid out. BERT-style encoders share one layout.
BERT_STYLE = ("bert", "roberta", "xlm-roberta", "electra")
DISTILBERT_STYLE = ("distilbert",)
# Decoders whose blocks are supported for unstructured pruning only (no structured surgery).
GPT2_STYLE = ("gpt2",)
STRUCTURED_TYPES = BERT_STYLE + DISTILBERT_STYLE
UNSTRUCTURED_TYPES = STRUCTURED_TYPES + GPT2_STYLE


@dataclass(frozen=True)
class Block:
    """The prunable modules of one transformer block."""

    index: int
    attention_linears: dict[str, nn.Module]  # name (relative to the model) -> Linear/Conv1D
    ffn_linears: dict[str, nn.Module]
    # Structured pruning only (None for decoders):
    attention: Any = None  # module whose prune_heads(list[int]) takes ORIGINAL head indices
    query: Any = None
    key: Any = None
    value: Any = None
    out: Any = None
    up: Any = None  # FFN up projection: its output rows are the intermediate neurons
    down: Any = None  # FFN down projection: its input columns are the intermediate neurons


def model_type(model: Any) -> str:
    return str(getattr(model.config, "model_type", None) or type(model).__name__)


def _prefix(model: Any) -> str:
    base_prefix = getattr(model, "base_model_prefix", "")
    return f"{base_prefix}." if base_prefix and getattr(model, base_prefix, None) is not None else ""


def blocks(model: Any, *, structured: bool) -> list[Block]:
    """The transformer blocks of `model`; InputError for an architecture that is not supported."""
    kind = model_type(model)
    supported = STRUCTURED_TYPES if structured else UNSTRUCTURED_TYPES
    if kind not in supported:
        what = "structured (ffn/heads)" if structured else "unstructured"
        raise InputError(
            f"prune: {what} pruning does not support model_type {kind!r} "
            f"({type(model).__name__}); supported: {', '.join(supported)}"
        )
    base = model.base_model
    prefix = _prefix(model)
    result = []
    if kind in BERT_STYLE:
        for i, layer in enumerate(base.encoder.layer):
            p = f"{prefix}encoder.layer.{i}"
            sa = layer.attention.self
            result.append(
                Block(
                    index=i,
                    attention_linears={
                        f"{p}.attention.self.query": sa.query,
                        f"{p}.attention.self.key": sa.key,
                        f"{p}.attention.self.value": sa.value,
                        f"{p}.attention.output.dense": layer.attention.output.dense,
                    },
                    ffn_linears={
                        f"{p}.intermediate.dense": layer.intermediate.dense,
                        f"{p}.output.dense": layer.output.dense,
                    },
                    attention=layer.attention,
                    query=sa.query,
                    key=sa.key,
                    value=sa.value,
                    out=layer.attention.output.dense,
                    up=layer.intermediate.dense,
                    down=layer.output.dense,
                )
            )
    elif kind in DISTILBERT_STYLE:
        for i, layer in enumerate(base.transformer.layer):
            p = f"{prefix}transformer.layer.{i}"
            att = layer.attention
            result.append(
                Block(
                    index=i,
                    attention_linears={
                        f"{p}.attention.q_lin": att.q_lin,
                        f"{p}.attention.k_lin": att.k_lin,
                        f"{p}.attention.v_lin": att.v_lin,
                        f"{p}.attention.out_lin": att.out_lin,
                    },
                    ffn_linears={f"{p}.ffn.lin1": layer.ffn.lin1, f"{p}.ffn.lin2": layer.ffn.lin2},
                    attention=att,
                    query=att.q_lin,
                    key=att.k_lin,
                    value=att.v_lin,
                    out=att.out_lin,
                    up=layer.ffn.lin1,
                    down=layer.ffn.lin2,
                )
            )
    else:  # GPT-2: fused c_attn (Conv1D), unstructured only
        for i, layer in enumerate(base.h):
            p = f"{prefix}h.{i}"
            result.append(
                Block(
                    index=i,
                    attention_linears={
                        f"{p}.attn.c_attn": layer.attn.c_attn,
                        f"{p}.attn.c_proj": layer.attn.c_proj,
                    },
                    ffn_linears={f"{p}.mlp.c_fc": layer.mlp.c_fc, f"{p}.mlp.c_proj": layer.mlp.c_proj},
                )
            )
    return result


def num_heads(model: Any, block: Block) -> int:
    """Heads currently left in `block`'s attention."""
    att = block.attention
    return int(att.n_heads if model_type(model) in DISTILBERT_STYLE else att.self.num_attention_heads)


def head_size(model: Any, block: Block) -> int:
    att = block.attention
    return int(
        att.attention_head_size if model_type(model) in DISTILBERT_STYLE else att.self.attention_head_size
    )


def config_heads(config: Any) -> int:
    """Heads per layer of the un-pruned architecture, as the config states it."""
    return int(config.n_heads if config.model_type in DISTILBERT_STYLE else config.num_attention_heads)


def intermediate_attr(config: Any) -> str:
    """Name of the config field that holds the FFN width."""
    return "hidden_dim" if config.model_type in DISTILBERT_STYLE else "intermediate_size"
