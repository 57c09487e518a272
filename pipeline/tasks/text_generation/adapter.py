"""The decoder's I/O adapter: parity cases with and without past, the PyTorch reference with a
KV cache, and the two timed calls (prefill of a prompt, one decode step after a fixed past).

Parity: each [batch, seq] of `export.parity.shapes` is checked as a prompt of seq tokens with an
empty past, and each past length (`export.parity.past_lens`, default the same seqs) as one decode
step; odd rows are left-padded as batched generation pads. Logits and every present key/value are
compared on the real positions; argmax agreement is computed on the logits of the new tokens.

Timing at context length L (batch 1): prefill = the L-token prompt with an empty past; decode =
one new token after a past of exactly L positions (the same past every time, so the latency is that
of context L, not of a growing cache).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pipeline.onnx.parity import ParityCase
from pipeline.tasks.text_generation.io import DecoderIO

Reference = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def decoder_grid(
    shapes: Sequence[Sequence[int]], past_lens: Sequence[int] | None = None
) -> list[tuple[int, int, int]]:
    """(batch, new tokens, past length) cases: every seq as a prompt, every past as one decode step,
    at the largest batch of the shapes (at most 4)."""
    seqs = sorted({int(s[1]) for s in shapes})
    batch = min(4, max(int(s[0]) for s in shapes))
    pasts = sorted(set(past_lens)) if past_lens else seqs
    return [(batch, n, 0) for n in seqs] + [(batch, 1, p) for p in pasts]


def decoder_inputs(
    io: DecoderIO, batch: int, seq: int, past: int, vocab_size: int, seed: int = 0
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Random but valid feeds (token ids, a random past of `past` positions, odd rows left-padded)
    and the attention mask over past + new positions."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(low=min(3, vocab_size - 1), high=vocab_size, size=(batch, seq), dtype=np.int64)
    total = past + seq
    mask = np.ones((batch, total), dtype=np.int64)
    for row in range(1, batch, 2):
        pad = min(total // 3, total - 1)  # at least the last (newest) token stays real
        mask[row, :pad] = 0
    return io.feeds(ids, mask, io.random_past(batch, past, rng)), mask


def parity_cases(
    session: Any, shapes: Sequence[Sequence[int]], vocab_size: int, past_lens: Sequence[int] | None = None
) -> list[ParityCase]:
    io = DecoderIO.from_session(session)
    cases = []
    for index, (batch, seq, past) in enumerate(decoder_grid(shapes, past_lens)):
        feeds, mask = decoder_inputs(io, batch, seq, past, vocab_size, seed=index)
        real = mask.astype(bool)
        valid: dict[str, np.ndarray] = {"logits": real[:, past:]}
        group = {"logits": "logits"}
        for pair in io.present_names:
            for name in pair:  # [batch, kv_heads, past + seq, head_dim]: padded cache slots dropped
                valid[name] = np.broadcast_to(real[:, None, :], (batch, io.kv_heads, past + seq))
                group[name] = "present"
        cases.append(
            ParityCase({"batch": batch, "new_tokens": seq, "past": past}, feeds, valid, ("logits",), group)
        )
    return cases


def cache_layers(cache: Any) -> list[tuple[Any, Any]]:
    """[(key, value)] per layer of a transformers cache object (or a legacy tuple)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "to_legacy_cache"):
        return list(cache.to_legacy_cache())
    return [(k, v) for k, v in cache]


def torch_reference(model: Any, session: Any) -> Reference:
    """Reference outputs ({output name: array}) from a transformers causal LM, past fed as a cache."""
    import torch
    from transformers import DynamicCache

    io = DecoderIO.from_session(session)

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        past_len = feeds[io.past_names[0][0]].shape[2]
        cache = None
        if past_len:
            cache = DynamicCache(
                [(torch.from_numpy(feeds[k]), torch.from_numpy(feeds[v])) for k, v in io.past_names]
            )
        kwargs: dict[str, Any] = {
            "input_ids": torch.from_numpy(feeds["input_ids"]),
            "attention_mask": torch.from_numpy(feeds["attention_mask"]),
            "past_key_values": cache,
            "use_cache": True,
        }
        if "position_ids" in feeds:
            kwargs["position_ids"] = torch.from_numpy(feeds["position_ids"])
        with torch.no_grad():
            out = model(**kwargs)
        by_name = {"logits": out.logits.float().numpy()}
        for (key, value), (k_t, v_t) in zip(io.present_names, cache_layers(out.past_key_values), strict=True):
            by_name[key], by_name[value] = k_t.float().numpy(), v_t.float().numpy()
        return by_name

    return run


class OnnxBackend:
    """Prefill and decode step of an ONNX decoder session (optimum's with-past layout)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.io = DecoderIO.from_session(session)
        self.names = list(self.io.output_names)

    def prefill(self, ids: np.ndarray) -> Any:
        mask = np.ones_like(ids)
        outputs = self.session.run(self.names, self.io.feeds(ids, mask, self.io.empty_past(ids.shape[0])))
        return self.io.past_from_outputs(outputs)

    def step(self, token: np.ndarray, past: Any) -> None:
        length = next(iter(past.values())).shape[2]
        mask = np.ones((token.shape[0], length + 1), dtype=np.int64)
        self.session.run(self.names, self.io.feeds(token, mask, past))


class TorchBackend:
    """Prefill and decode step of a transformers causal LM, eager fp32, with its own DynamicCache."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def prefill(self, ids: np.ndarray) -> Any:
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.from_numpy(ids), use_cache=True)
        return [(k.clone(), v.clone()) for k, v in cache_layers(out.past_key_values)]

    def step(self, token: np.ndarray, past: Any) -> None:
        import torch
        from transformers import DynamicCache

        # A fresh cache object per step: DynamicCache appends in place, the past must stay length L.
        cache = DynamicCache(past)
        length = past[0][0].shape[2]
        with torch.no_grad():
            self.model(
                input_ids=torch.from_numpy(token),
                attention_mask=torch.ones((token.shape[0], length + 1), dtype=torch.long),
                past_key_values=cache,
                use_cache=True,
            )


def timing_calls(
    runner: Any, batch: int, length: int, vocab_size: int, seed: int = 0
) -> dict[str, Callable[[], Any]]:
    """{"prefill": the `length`-token prompt, "decode": one token after a past of `length`}."""
    backend = OnnxBackend(runner) if hasattr(runner, "get_inputs") else TorchBackend(runner)
    rng = np.random.default_rng(seed + length)
    ids = rng.integers(3, vocab_size, size=(batch, length), dtype=np.int64)
    token = rng.integers(3, vocab_size, size=(batch, 1), dtype=np.int64)
    past = backend.prefill(ids)
    return {"prefill": lambda: backend.prefill(ids), "decode": lambda: backend.step(token, past)}
