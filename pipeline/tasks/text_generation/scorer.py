"""Decoder quality on held-out text: perplexity on the same token ids and windows for PyTorch and
every ONNX variant, and greedy-generation agreement of each variant's KV-cache loop with
transformers' generate() on the same prompts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.tasks.base import Scored, load_tokenizer

MAX_TOKENS = 4096  # of held-out text scored for perplexity
PROMPTS = 8  # greedy-agreement prompts (the first 8..32 tokens of successive texts)
NEW_TOKENS = 16  # generated per prompt


class DecoderScorer:
    """Perplexity and greedy agreement of the PyTorch baseline and ONNX sessions.

    The window defaults to the model's context size capped at 256, the stride to half of it.
    """

    def __init__(
        self,
        task: Any,
        checkpoint: Path,
        examples: Sequence[Any],
        *,
        max_length: int,
        batch_size: int,
        trust_remote_code: bool = False,
        generation: Any = None,
    ) -> None:
        from pipeline.model_source import random_weights
        from pipeline.tasks.text_generation.generate import prompts_from_texts
        from pipeline.tasks.text_generation.perplexity import text_token_ids

        prompts = generation.prompts if generation is not None else PROMPTS
        new_tokens = generation.new_tokens if generation is not None else NEW_TOKENS
        window = generation.window if generation is not None else None
        self.tokenizer = load_tokenizer(checkpoint, trust_remote_code)
        texts = [e.text for e in examples]
        self.ids = text_token_ids(self.tokenizer, texts, MAX_TOKENS)
        self.prompts = prompts_from_texts(self.tokenizer, texts, prompts)
        self.new_tokens = new_tokens
        self.window_asked = window
        self.model: Any = None
        # PyTorch's greedy tokens per generation batch size (greedy_batch_size), made once each
        self.references: dict[int, list[list[int]]] = {}
        self.base: dict[str, Any] = {}
        self.settings: dict[str, Any] = {
            "latency_meaning": "decoder: p50/p90 ms of one decode step after a past of seq tokens; "
            "throughput = decode tokens/s; prefill_ms_p50 = the seq-token prompt",
        }
        self.notes: list[str] = []
        self.texts = len(texts)
        if random_weights(checkpoint):
            self.notes.append(
                "random weights (config.json pipeline_random_weights): perplexity and agreement measure "
                "the export, not a language model"
            )
        self.settings["random_weights"] = random_weights(checkpoint)

    def baseline(self, model: Any) -> Scored:
        from pipeline.tasks.text_generation.perplexity import perplexity, torch_logits_fn

        self.model = model
        context = getattr(model.config, "n_positions", None) or getattr(
            model.config, "max_position_embeddings", 256
        )
        self.window = self.window_asked or min(int(context), 256)
        if self.window > context:
            raise InputError(f"validate: window {self.window} exceeds the model's context size {context}")
        self.stride = max(1, self.window // 2)
        self.base = perplexity(torch_logits_fn(model), self.ids, self.window, self.stride)
        self.settings["decoder_text"] = {
            "documents": self.texts,
            "tokens": int(self.ids.size),
            "window": self.window,
            "stride": self.stride,
        }
        return Scored({"perplexity": self.base["perplexity"], "token_agreement": 1.0})

    def variant(self, session: Any, label: str) -> Scored:
        from pipeline.tasks.text_generation.generate import (
            greedy_agreement,
            greedy_batch_size,
            torch_greedy,
        )
        from pipeline.tasks.text_generation.perplexity import onnx_logits_fn, perplexity

        ppl = perplexity(onnx_logits_fn(session), self.ids, self.window, self.stride)["perplexity"]
        batch = greedy_batch_size(session)
        if batch not in self.references:
            self.references[batch] = torch_greedy(self.model, self.prompts, self.new_tokens, batch_size=batch)
        greedy = greedy_agreement(
            self.model, session, self.prompts, self.new_tokens, label=label, references=self.references[batch]
        )
        metrics = {
            "perplexity": ppl,
            "perplexity_ratio": ppl / self.base["perplexity"],
            "token_agreement": greedy["token_agreement"],
            "exact_sequences": greedy["exact_sequences"],
        }
        return Scored(metrics, greedy["token_agreement"], extra={"greedy": greedy})
