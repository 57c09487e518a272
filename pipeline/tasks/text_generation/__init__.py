"""Text generation (causal LMs), a Task like the others: KV-cache export, perplexity, tokens/s.

One model.onnx serves the prompt and every decode step (optimum's text-generation-with-past
layout, see io.py). What this task supplies to the shared stages:
- export: the LM head is required; Gemm linear layers are rewritten as MatMul (graph.py) so the
  INT8 and INT4 quantizers reach them; parity covers prompts and decode steps (adapter.py);
- quantization policy: the LM head (largest decode-time MatMul; tied to the embedding in most
  small models) and the token embedding stay fp32 unless the recipe asks (quantize_lm_head,
  quantize_embedding): measured on tiny trained models, quantizing the head cost the most quality
  (INT4 RTN b32 perplexity +0.38% vs +0.04% with the head fp32) and made tied models bigger;
- timing: a prefill of seq tokens and one decode step after a past of seq tokens, batch 1;
- validation: perplexity on held-out text and greedy agreement with PyTorch (scorer.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, StageError
from pipeline.tasks.base import QuantPolicy, Task

RELEASE_SNIPPET = """
encoding = tokenizer.encode("The company said that")
ids = np.array([encoding.ids], dtype=np.int64)
inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids),
          "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]}
for value in session.get_inputs():  # an empty KV cache: [batch, heads, 0, head_dim]
    if value.name.startswith("past_key_values"):
        shape = [1] + [d if isinstance(d, int) else 0 for d in value.shape[1:]]
        inputs[value.name] = np.zeros(shape, dtype=dtypes[value.name])
logits = session.run(None, {name: inputs[name] for name in dtypes})[0]
print(tokenizer.decode([int(logits[0, -1].argmax())]))  # the greedy next token
"""
_REPORTED_OPS = ("MatMul", "Gemm", "Gather", "Softmax", "LayerNormalization", "Transpose")


class TextGeneration(Task):
    """Causal language modelling; headline metric perplexity (lower is better)."""

    name = "text-generation"
    optimum_task = "text-generation-with-past"
    auto_class = "AutoModelForCausalLM"
    metrics = ("perplexity", "token_agreement")
    lower_is_better = ("perplexity",)
    fusion_opt_level = 0  # ORT's own graph optimizations stay at session time for decoders
    primary_call = "decode"  # speed-ups are per generated token

    def check_exportable(self, model: Any, folder: Path) -> None:
        if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
            raise InputError(f"{folder}: the model has no language-model head (not a causal LM)")

    def prepare_export(self, proto: Any) -> dict[str, Any]:
        from pipeline.tasks.text_generation.graph import gemm_to_matmul

        return {"gemm_rewritten_as_matmul": gemm_to_matmul(proto)}

    def fuse_attention(
        self,
        proto: Any,
        config: dict[str, Any],
        required: bool | None,
        rotary_in_attention: bool | None = False,
    ) -> dict[str, Any]:
        from pipeline.tasks.text_generation.attention import (
            NotApplicable,
            RotaryNotApplicable,
            feed_packed_qkv,
            group_query_attention,
        )
        from pipeline.tasks.text_generation.graph import pack_sibling_matmuls

        if required is False:
            return {"applied": False, "reason": "group_query_attention: false in the recipe"}

        rotary, rotary_reason = rotary_in_attention is not False, None
        try:
            try:
                done = group_query_attention(proto, config, rotary_in_attention=rotary)
            except RotaryNotApplicable as why:
                if rotary_in_attention:
                    raise InputError(
                        f"optimize.rotary_in_attention: does not apply to this model: {why}"
                    ) from None
                # Nothing was changed yet: the RotaryEmbedding form still fits.
                rotary, rotary_reason = False, str(why)
                done = group_query_attention(proto, config, rotary_in_attention=False)
        except NotApplicable as why:
            if required or rotary_in_attention:
                field = "group_query_attention" if required else "rotary_in_attention"
                raise InputError(f"optimize.{field}: does not apply to this model: {why}") from None
            return {"applied": False, "reason": str(why)}
        # q/k/v now feed GroupQueryAttention directly, so they (and gate/up) can share one MatMul.
        packed = pack_sibling_matmuls(proto)
        done = {"applied": True, **done, "matmuls_packed": packed, "rotary_in_attention": rotary}
        if rotary_reason:
            done["rotary_in_attention_reason"] = rotary_reason
        if rotary:
            done["packed_qkv_into_attention"] = feed_packed_qkv(proto)
        return done

    def fused_reference(self, proto: Any, reference: Any) -> Any:
        from pipeline.tasks.text_generation.attention import slot_rotation_reference

        return slot_rotation_reference(proto, reference) or reference

    def parity_cases(self, session: Any, shapes: Sequence[Sequence[int]], vocab_size: int, past_lens=None):
        from pipeline.tasks.text_generation.adapter import parity_cases

        return parity_cases(session, shapes, vocab_size, past_lens)

    def torch_reference(self, model: Any, session: Any) -> Any:
        from pipeline.tasks.text_generation.adapter import torch_reference

        return torch_reference(model, session)

    def export_facts(self, model: Any, session: Any, graph: Any) -> dict[str, Any]:
        from pipeline.tasks.text_generation.graph import lm_head_is_tied, op_counts
        from pipeline.tasks.text_generation.io import DecoderIO

        io = DecoderIO.from_session(session)
        return {
            "model_type": model.config.model_type,
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "layers": io.layers,
            "kv_heads": io.kv_heads,
            "head_dim": io.head_dim,
            "lm_head_tied": lm_head_is_tied(graph),
            "op_counts": {k: v for k, v in sorted(op_counts(graph).items()) if k in _REPORTED_OPS},
        }

    def quantization_policy(self, proto: Any, config: Any = None) -> QuantPolicy:
        """LM head and embedding per `config` (quantize_lm_head / quantize_embedding, both off by
        default); INT8 and INT4 quantize MatMuls only. The parity grid feeds random pasts, so no
        argmax floor: decoder quality is judged by perplexity and greedy agreement in validation."""
        from pipeline.tasks.text_generation.graph import embedding_node, lm_head_is_tied, lm_head_node

        quantize_head = bool(getattr(config, "quantize_lm_head", False))
        quantize_embedding = bool(getattr(config, "quantize_embedding", False))
        head, embedding, tied = lm_head_node(proto), embedding_node(proto), lm_head_is_tied(proto)
        if quantize_head and head is None:
            raise StageError(
                "quantize.quantize_lm_head: no LM head MatMul producing the logits in this graph"
            )
        op_types = ["MatMul", "Gather"] if quantize_embedding else ["MatMul"]
        policy = QuantPolicy(
            op_types={"dynamic": op_types, "weight_only_int4": op_types, "weight_only_int8": op_types},
            keep_float=[head.name] if head is not None and head.name and not quantize_head else [],
            notes={
                "lm_head": {
                    "node": head.name if head is not None else None,
                    "tied_in_export": tied,
                    "quantized": quantize_head,
                    "untied_for_quantization": quantize_head and tied,
                },
                "embedding": {
                    "node": embedding.name if embedding is not None else None,
                    "quantized": quantize_embedding,
                },
            },
        )
        if quantize_head and tied:
            # A tied head is MatMul(h, Transpose(E)), which no quantizer touches: materialise E^T.
            from pipeline.tasks.text_generation.graph import untie_lm_head

            policy.prepare = untie_lm_head
        return policy

    def timing_batches(self, batch_sizes: Sequence[int]) -> list[int]:
        return [1]  # per-token decode latency; batching is the server's business

    def timing_calls(
        self, runner: Any, batch: int, seq: int, vocab_size: int
    ) -> dict[str, Callable[[], Any]]:
        from pipeline.tasks.text_generation.adapter import timing_calls

        return timing_calls(runner, batch, seq, vocab_size)

    def timed_calls(
        self, runner: Any, batch: int, seq: int, vocab_size: int, latency: Any
    ) -> dict[str, Callable[[], Any]]:
        """The decode step at every shape; the prefill only at latency.prefill_seq_lens (all if unset)."""
        calls = self.timing_calls(runner, batch, seq, vocab_size)
        if not _times_prefill(seq, latency):
            del calls["prefill"]
        return calls

    def timed_runs(self, seq: int, latency: Any) -> dict[str, int]:
        runs = {"decode": latency.iters}
        if _times_prefill(seq, latency):
            runs["prefill"] = latency.prefill_iters or latency.iters
        return runs

    def latency_entry(self, stats: dict[str, dict[str, Any]], batch: int, seq: int) -> dict[str, Any]:
        decode, prefill = stats["decode"], stats.get("prefill")  # no prefill: not timed at this seq
        p50 = prefill["p50_ms"] if prefill else None
        return {
            **decode,
            "throughput_per_s": round(1e3 / decode["p50_ms"], 3) if decode["p50_ms"] else None,
            "prefill_ms_p50": p50,
            "prefill_ms_p90": prefill["p90_ms"] if prefill else None,
            "prefill_iters": prefill["iters"] if prefill else None,
            "prompt_tokens_per_s": round(seq * 1e3 / p50, 3) if p50 else None,
        }

    def scorer(self, checkpoint: Path, examples: Sequence[Any], **settings: Any) -> Any:
        from pipeline.tasks.text_generation.scorer import DecoderScorer

        return DecoderScorer(self, checkpoint, examples, **settings)

    def release_snippet(self) -> str:
        return RELEASE_SNIPPET

    def write_runtime_files(self, folder: Path) -> list[str]:
        """genai_config.json: the bundle runs under onnxruntime-genai too (its Model/Generator
        loop), with the KV cache laid out as optimum exports it (see genai.py)."""
        from pipeline.tasks.text_generation.genai import write_genai_config

        return [write_genai_config(folder).name]


def _times_prefill(seq: int, latency: Any) -> bool:
    """Whether the prefill is timed at `seq` (validate.latency.prefill_seq_lens; unset: always)."""
    return latency.prefill_seq_lens is None or seq in latency.prefill_seq_lens
