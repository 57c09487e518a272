"""Perplexity on held-out text with a sliding window (the Hugging Face method), for any logits source.

Tokens are scored once each: a window of `window` tokens moves by `stride`; in each window only the
tokens not scored by an earlier window count, each with up to `window - 1` tokens of context. The
first token of the text has no context and is never scored. PyTorch and ONNX Runtime are scored on
the same token ids, so their perplexities are comparable to the last digit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pipeline.errors import InputError

LogitsFn = Callable[[np.ndarray], np.ndarray]  # ids [1, n] -> logits [1, n, vocab]


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64: logsumexp minus the target's logit.

    The exponentials run in the logits' own float32 (numpy sums pairwise, so the sum keeps float32's
    ~1e-7 relative error: 1e-7 in perplexity) and only the per-row results in float64: a float64
    log-softmax of every row (256 x 49,152 per window) took more time than some models' forward.
    """
    x = np.asarray(logits)
    top = x.max(axis=-1, keepdims=True)
    sums = np.exp(x - top).sum(axis=-1, dtype=np.float64)
    picked = np.take_along_axis(x, targets[:, None], axis=-1)[:, 0]
    return top[:, 0].astype(np.float64) + np.log(sums) - picked.astype(np.float64)


def perplexity(
    logits_fn: LogitsFn, token_ids: Sequence[int], window: int, stride: int | None = None
) -> dict[str, Any]:
    """exp(mean negative log-likelihood) of `token_ids` under `logits_fn`, sliding window."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    stride = stride or window - 1
    if ids.size < 2:
        raise InputError(f"perplexity: need at least 2 tokens of text, got {ids.size}")
    if window < 2:
        raise InputError(f"perplexity: window must be >= 2, got {window}")
    if not 1 <= stride < window:
        # With stride == window a window's first token would be scored with no context at all.
        raise InputError(f"perplexity: stride must be in 1..{window - 1} (below the window), got {stride}")
    nll, count, windows, scored_until = 0.0, 0, 0, 1  # position 0 is never scored
    begin = 0
    while scored_until < ids.size:
        end = min(begin + window, ids.size)
        chunk = ids[begin:end]
        logits = np.asarray(logits_fn(chunk[None, :]))
        if logits.shape[:2] != (1, chunk.size):
            raise InputError(f"perplexity: logits shape {logits.shape} for {chunk.size} tokens")
        # logits at position t predict token t + 1: score targets scored_until .. end - 1
        first = scored_until - begin
        targets = chunk[first:]
        nll += float(token_nll(logits[0, first - 1 : chunk.size - 1], targets).sum())
        count += int(targets.size)
        windows += 1
        scored_until = end
        if end == ids.size:
            break
        begin += stride
    mean = nll / count
    return {
        "perplexity": math.exp(mean),
        "nll_per_token": mean,
        "tokens_scored": count,
        "windows": windows,
        "window": window,
        "stride": stride,
    }


def adapter_perplexity_matrix(
    session: Any, adapters: Sequence[str], texts: dict[str, np.ndarray], window: int
) -> dict[str, dict[str, float]]:
    """Perplexity of an adapter-switching session (pipeline.onnx.lora.AdaptedSession) with no
    adapter ("base") and with each adapter, on each named token sequence; stride window / 2."""
    matrix: dict[str, dict[str, float]] = {}
    for active in (None, *adapters):
        session.activate(active)
        logits = onnx_logits_fn(session)
        matrix[active or "base"] = {
            name: round(perplexity(logits, ids, window=window, stride=window // 2)["perplexity"], 4)
            for name, ids in texts.items()
        }
    session.activate(None)
    return matrix


def onnx_logits_fn(session: Any) -> LogitsFn:
    """Logits of a KV-cache decoder session for a whole window (empty past)."""
    from pipeline.tasks.text_generation.io import DecoderIO

    io = DecoderIO.from_session(session)
    names = list(io.output_names)
    index = names.index("logits")

    def run(ids: np.ndarray) -> np.ndarray:
        mask = np.ones_like(ids, dtype=np.int64)
        # Only the logits are wanted, but ORT computes the presents anyway (they are cheap next to
        # the LM head); asking for logits alone lets ORT skip copying them out.
        return session.run([names[index]], io.feeds(ids, mask, io.empty_past(ids.shape[0])))[0]

    return run


def torch_logits_fn(model: Any) -> LogitsFn:
    """Logits of a transformers causal LM for a whole window (no cache)."""
    import torch

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids), use_cache=False)
        return out.logits.float().numpy()

    return run


def text_token_ids(tokenizer: Any, texts: Sequence[str], max_tokens: int | None = None) -> np.ndarray:
    """Token ids of the texts joined by the EOS token (documents separated as in LM training)."""
    if not texts:
        raise InputError("perplexity: no held-out text")
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return np.asarray(ids[:max_tokens] if max_tokens else ids, dtype=np.int64)
