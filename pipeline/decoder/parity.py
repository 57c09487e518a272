"""Parity of a KV-cache decoder against a reference, on prompt (empty past) and decode (with past) cases.

Both the logits AND every present key/value output are compared; padded positions (odd rows are
left-padded, as batched generation pads) are excluded from the differences, but any NaN/inf anywhere
in the checked model's outputs fails: a NaN in a padded cache slot poisons every later step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from pipeline.config import StrictModel
from pipeline.decoder.io import DecoderIO
from pipeline.errors import ParityError

Reference = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class DecoderParityConfig(StrictModel):
    """Shape grid of the decoder parity check."""

    atol: float = Field(1e-4, gt=0, description="Largest allowed |ONNX - reference| of logits and presents.")
    batch_size: int = Field(2, ge=1, le=16, description="Rows per case; odd rows are left-padded.")
    prompt_lens: list[int] = Field(
        [1, 7, 33], min_length=1, description="Prompt lengths checked with an empty past (prefill)."
    )
    past_lens: list[int] = Field(
        [1, 8, 40], min_length=1, description="Past lengths checked with one decode step (step_len tokens)."
    )
    step_len: int = Field(
        1, ge=1, description="New tokens per decode-step case (1 = token-by-token decoding)."
    )

    @field_validator("prompt_lens", "past_lens")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(v < 1 for v in value):
            raise ValueError(f"expected lengths >= 1, got {value}")
        return value

    def cases(self) -> list[tuple[int, int, int]]:
        """(batch, new tokens, past length) of every case: prompts first, then decode steps."""
        prompts = [(self.batch_size, n, 0) for n in self.prompt_lens]
        steps = [(self.batch_size, self.step_len, p) for p in self.past_lens]
        return prompts + steps

    @classmethod
    def from_export_parity(cls, atol: float, shapes: Sequence[Sequence[int]]) -> DecoderParityConfig:
        """Map the recipe's encoder-style `export.parity` ([batch, seq] shapes) onto a decoder grid:
        each seq is checked as a prompt length and as a past length, at the largest batch (max 4)."""
        seqs = sorted({int(s[1]) for s in shapes})
        batch = min(4, max(int(s[0]) for s in shapes))
        return cls(atol=atol, batch_size=batch, prompt_lens=seqs, past_lens=seqs)


def decoder_inputs(
    io: DecoderIO, batch: int, seq: int, past: int, vocab_size: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random but valid feeds: token ids, a random past of `past` positions, odd rows left-padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(low=min(3, vocab_size - 1), high=vocab_size, size=(batch, seq), dtype=np.int64)
    total = past + seq
    mask = np.ones((batch, total), dtype=np.int64)
    for row in range(1, batch, 2):
        pad = min(total // 3, total - 1)  # at least the last (newest) token stays real
        mask[row, :pad] = 0
    return io.feeds(ids, mask, io.random_past(batch, past, rng))


def decoder_parity_grid(
    reference: Reference,
    session: Any,
    cases: Sequence[tuple[int, int, int]],
    atol: float,
    vocab_size: int,
    *,
    label: str = "ONNX decoder",
    min_argmax_agreement: float | None = None,
    raise_on_atol: bool = True,
) -> dict[str, Any]:
    """Compare `session` with `reference(feeds) -> {output name: array}` on each case.

    Returns {atol, max_abs_diff, max_abs_diff_logits, max_abs_diff_present, argmax_agreement, cases};
    raises ParityError above `atol` (unless raise_on_atol is False), on NaN/inf, on a shape mismatch,
    or when argmax agreement falls below `min_argmax_agreement`.
    """
    io = DecoderIO.from_session(session, label)
    names = list(io.output_names)
    per_case, worst_logits, worst_present, agree, total = [], 0.0, 0.0, 0, 0
    for index, (batch, seq, past) in enumerate(cases):
        feeds = decoder_inputs(io, batch, seq, past, vocab_size, seed=index)
        by_name = reference(feeds)
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ParityError(f"{label}: the reference has no output {missing[0]!r}")
        expected = [by_name[n] for n in names]
        actual = session.run(names, feeds)
        mask = feeds["attention_mask"].astype(bool)
        new_mask = mask[:, past:]
        case_logits, case_present = 0.0, 0.0
        for name, exp, act in zip(names, expected, actual, strict=True):
            exp = np.asarray(exp, dtype=np.float64)
            act = np.asarray(act, dtype=np.float64)
            where = f"output {name!r} at batch {batch}, {seq} new tokens, past {past}"
            if exp.shape != act.shape:
                raise ParityError(f"{label}: {where} has shape {act.shape}, reference {exp.shape}")
            if not np.all(np.isfinite(act)):
                raise ParityError(f"{label}: {where} has NaN/inf")
            diff = np.abs(exp - act)
            if name == "logits":
                valid = diff[new_mask]
                case_logits = max(case_logits, float(valid.max()) if valid.size else 0.0)
                same = np.argmax(exp, axis=-1)[new_mask] == np.argmax(act, axis=-1)[new_mask]
                agree += int(same.sum())
                total += int(same.size)
            else:  # [batch, heads, past + seq, head_dim]: drop padded cache slots
                valid = diff.transpose(0, 2, 1, 3)[mask]
                case_present = max(case_present, float(valid.max()) if valid.size else 0.0)
        per_case.append(
            {
                "batch": batch,
                "new_tokens": seq,
                "past": past,
                "max_abs_diff_logits": case_logits,
                "max_abs_diff_present": case_present,
            }
        )
        worst_logits, worst_present = max(worst_logits, case_logits), max(worst_present, case_present)
    worst = max(worst_logits, worst_present)
    agreement = agree / total if total else 1.0
    result = {
        "atol": None if math.isinf(atol) else atol,
        "max_abs_diff": worst,
        "max_abs_diff_logits": worst_logits,
        "max_abs_diff_present": worst_present,
        "argmax_agreement": agreement,
        "cases": per_case,
    }
    if raise_on_atol and worst > atol:
        bad = max(per_case, key=lambda c: max(c["max_abs_diff_logits"], c["max_abs_diff_present"]))
        what = "logits" if bad["max_abs_diff_logits"] >= bad["max_abs_diff_present"] else "present key/value"
        raise ParityError(
            f"{label}: max |diff| {worst:.3g} ({what}) exceeds atol {atol:g} "
            f"(worst at batch {bad['batch']}, {bad['new_tokens']} new tokens, past {bad['past']})"
        )
    if min_argmax_agreement is not None and agreement < min_argmax_agreement:
        raise ParityError(
            f"{label}: argmax agreement {agreement:.3f} is below the minimum {min_argmax_agreement:g}"
        )
    return result


def torch_reference(model: Any, io: DecoderIO) -> Reference:
    """Reference outputs ({output name: array}) from a transformers causal LM."""
    import torch
    from transformers import DynamicCache

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
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


def cache_layers(cache: Any) -> list[tuple[Any, Any]]:
    """[(key, value)] per layer of a transformers cache object (or a legacy tuple)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "to_legacy_cache"):
        return list(cache.to_legacy_cache())
    return [(k, v) for k, v in cache]


def session_reference(session: Any) -> Reference:
    """Reference outputs from another ONNX session (e.g. the fp32 export for a quantized model)."""
    names = [o.name for o in session.get_outputs()]
    inputs = {i.name for i in session.get_inputs()}

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = session.run(names, {k: v for k, v in feeds.items() if k in inputs})
        return dict(zip(names, outputs, strict=True))

    return run
