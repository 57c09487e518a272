"""Decoder speed: prompt-processing tokens/s and per-token decode latency, vs PyTorch eager.

For each context length L (batch 1):
- prefill: the L-token prompt with an empty past; prompt tokens/s = L / time.
- decode step: one new token after a past of exactly L positions (the same past every time, so the
  latency is that of context L, not of a growing cache); p50/p90 in ms, decode tokens/s = 1000 / p50.
All backends are timed in the same process, interleaved (turns of `block` timed runs after `settle`
untimed ones, the order rotated every round), with the thread count pinned, so that their ratios
hold on a noisy machine. The untimed runs matter: a runtime whose thread pool still spins after its
run slows the next backend's first run (pipeline.bench.latency).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.errors import InputError


class OnnxBackend:
    """An ONNX decoder session (optimum with-past layout)."""

    def __init__(self, session: Any) -> None:
        from pipeline.decoder.io import DecoderIO

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
    """A transformers causal LM, eager mode, fp32, with its own DynamicCache."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def prefill(self, ids: np.ndarray) -> Any:
        import torch

        from pipeline.decoder.parity import cache_layers

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


def decode_speed(
    backends: dict[str, Any],
    context_lens: Sequence[int],
    *,
    vocab_size: int,
    warmup: int = 2,
    iters: int = 10,
    threads: int = 2,
    baseline: str | None = "pytorch",
    seed: int = 0,
    block: int = 5,
    settle: int = 1,
) -> dict[str, Any]:
    """Time every backend at every context length, interleaved; ratios vs `baseline` when present.

    Returns {threads, iters, context_lens, results: {backend: {L: {...}}}, speedup: {...}}.
    """
    import torch

    if not backends:
        raise InputError("decode_speed: no backends to time")
    if iters < 1 or block < 1 or warmup < 0 or settle < 0:
        raise InputError(
            f"decode_speed: need iters, block >= 1 and warmup, settle >= 0 "
            f"(got {iters}, {block}, {warmup}, {settle})"
        )
    if not context_lens or min(context_lens) < 1:
        raise InputError(f"decode_speed: context lengths must be >= 1, got {list(context_lens)}")
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    names = list(backends)
    results: dict[str, dict[str, Any]] = {name: {} for name in names}
    for length in context_lens:
        ids = rng.integers(3, vocab_size, size=(1, length), dtype=np.int64)
        token = rng.integers(3, vocab_size, size=(1, 1), dtype=np.int64)
        pasts = {name: backends[name].prefill(ids) for name in names}
        prefill_ms: dict[str, list[float]] = {n: [] for n in names}
        step_ms: dict[str, list[float]] = {n: [] for n in names}
        for name in names:  # untimed warm-up, one backend at a time
            for _ in range(warmup):
                backends[name].prefill(ids)
                backends[name].step(token, pasts[name])
        for round_index in range(math.ceil(iters / block)):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for name in order:
                backend = backends[name]
                for _ in range(settle):  # absorbs the previous backend's still-busy threads
                    backend.prefill(ids)
                    backend.step(token, pasts[name])
                for _ in range(min(block, iters - len(step_ms[name]))):
                    start = time.perf_counter()
                    backend.prefill(ids)
                    middle = time.perf_counter()
                    backend.step(token, pasts[name])
                    end = time.perf_counter()
                    prefill_ms[name].append((middle - start) * 1e3)
                    step_ms[name].append((end - middle) * 1e3)
        for name in names:
            p = np.asarray(prefill_ms[name])
            s = np.asarray(step_ms[name])
            results[name][str(length)] = {
                "prefill_ms_p50": float(np.percentile(p, 50)),
                "prompt_tokens_per_s": float(length / (np.percentile(p, 50) / 1e3)),
                "decode_ms_p50": float(np.percentile(s, 50)),
                "decode_ms_p90": float(np.percentile(s, 90)),
                "decode_tokens_per_s": float(1e3 / np.percentile(s, 50)),
            }
    speedup: dict[str, Any] = {}
    if baseline in results:
        for name in names:
            if name == baseline:
                continue
            speedup[name] = {
                length: {
                    "prefill": results[baseline][length]["prefill_ms_p50"] / r["prefill_ms_p50"],
                    "decode": results[baseline][length]["decode_ms_p50"] / r["decode_ms_p50"],
                }
                for length, r in results[name].items()
            }
    return {
        "threads": threads,
        "warmup": warmup,
        "iters": iters,
        "block": block,
        "settle": settle,
        "batch": 1,
        "context_lens": list(context_lens),
        "results": results,
        "speedup_vs_" + (baseline or "none"): speedup,
    }


def format_table(speed: dict[str, Any]) -> str:
    """A plain-text table of a decode_speed result."""
    baseline_key = next((k for k in speed if k.startswith("speedup_vs_")), "speedup_vs_none")
    baseline = baseline_key.removeprefix("speedup_vs_")
    speedup = speed.get(baseline_key, {})
    header = (
        f"{'variant':<16}{'ctx':>6}{'prompt tok/s':>14}{'decode p50 ms':>15}{'p90 ms':>9}"
        f"{'decode tok/s':>14}{'prefill x':>11}{'decode x':>10}"
    )
    lines = [header, "-" * len(header)]
    for name, per_len in speed["results"].items():
        for length, r in per_len.items():
            ratio = speedup.get(name, {}).get(length)
            lines.append(
                f"{name:<16}{length:>6}{r['prompt_tokens_per_s']:>14.1f}{r['decode_ms_p50']:>15.2f}"
                f"{r['decode_ms_p90']:>9.2f}{r['decode_tokens_per_s']:>14.1f}"
                + (
                    f"{ratio['prefill']:>10.2f}x{ratio['decode']:>9.2f}x"
                    if ratio
                    else (f"{'1.00x':>11}{'1.00x':>10}" if name == baseline else f"{'-':>11}{'-':>10}")
                )
            )
    return "\n".join(lines)
