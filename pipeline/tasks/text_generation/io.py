"""The input/output contract of a decoder exported with past key values (optimum's layout).

One ONNX model serves both the prompt (prefill) and each decode step:

    inputs : input_ids [batch, seq], attention_mask [batch, past + seq], position_ids [batch, seq]
             (optional), past_key_values.{i}.key/.value [batch, kv_heads, past, head_dim]
    outputs: logits [batch, seq, vocab], present.{i}.key/.value [batch, kv_heads, past + seq, head_dim]

The prompt is run with an EMPTY past (length 0); each decode step feeds the previous presents back as
past. Position ids follow Hugging Face's generate(): cumsum(attention_mask) - 1, 1 at padded slots,
so left-padded batches give every real token the position it would have alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import InputError

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass(frozen=True)
class DecoderIO:
    """Names, shapes and dtype of one decoder session's inputs and outputs."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    past_names: tuple[tuple[str, str], ...]  # per layer: (key input, value input)
    present_names: tuple[tuple[str, str], ...]  # per layer: (key output, value output)
    kv_heads: int
    head_dim: int
    dtype: Any  # numpy dtype of the past tensors
    vocab_size: int | None = None  # last dimension of the logits, when fixed

    @property
    def layers(self) -> int:
        return len(self.past_names)

    @property
    def has_position_ids(self) -> bool:
        return "position_ids" in self.input_names

    @classmethod
    def from_session(cls, session: Any, label: str = "ONNX model") -> DecoderIO:
        """Read the contract from an InferenceSession; InputError when it is not a KV-cache decoder."""
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        past = _layered(inputs, _PAST)
        present = _layered(dict.fromkeys(outputs), _PRESENT)
        missing = [n for n in ("input_ids", "attention_mask") if n not in inputs]
        if missing or "logits" not in outputs:
            raise InputError(
                f"{label}: not a decoder language model (needs inputs input_ids, attention_mask and "
                f"output logits; has inputs {', '.join(inputs)} and outputs {', '.join(outputs)})"
            )
        if not past or len(past) != len(present):
            raise InputError(
                f"{label}: no KV cache: expected past_key_values.N.key/value inputs matching "
                f"present.N.key/value outputs (export with task text-generation-with-past); got "
                f"{len(past)} past and {len(present)} present layers"
            )
        first = inputs[past[0][0]]
        shape = list(first.shape)
        if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise InputError(
                f"{label}: past input {first.name!r} has shape {shape}; expected "
                "[batch, kv_heads, past_sequence_length, head_dim] with fixed heads and head_dim"
            )
        logits_shape = next(o.shape for o in session.get_outputs() if o.name == "logits")
        vocab = logits_shape[-1] if logits_shape and isinstance(logits_shape[-1], int) else None
        dtype = _ORT_TYPES.get(first.type)
        if dtype is None:
            raise InputError(f"{label}: past input {first.name!r} has unsupported type {first.type}")
        return cls(
            input_names=tuple(inputs),
            output_names=tuple(outputs),
            past_names=tuple(past),
            present_names=tuple(present),
            kv_heads=shape[1],
            head_dim=shape[3],
            dtype=dtype,
            vocab_size=vocab,
        )

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Past tensors of length 0: the prompt step."""
        return self.random_past(batch, 0, np.random.default_rng(0))

    def random_past(self, batch: int, length: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Past tensors of `length` positions filled with N(0, 1) values (parity tests)."""
        shape = (batch, self.kv_heads, length, self.head_dim)
        return {
            name: rng.standard_normal(shape).astype(self.dtype) for pair in self.past_names for name in pair
        }

    def feeds(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Session feeds for new tokens `input_ids` [batch, seq] after `past` (mask covers both)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        feeds: dict[str, np.ndarray] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.has_position_ids:
            feeds["position_ids"] = position_ids(attention_mask, input_ids.shape[1])
        feeds.update(past)
        return feeds

    def past_from_outputs(self, outputs: list[np.ndarray]) -> dict[str, np.ndarray]:
        """The presents of a session.run(self.output_names, ...) result, renamed as the next past."""
        by_name = dict(zip(self.output_names, outputs, strict=True))
        return {
            past: by_name[present]
            for past_pair, present_pair in zip(self.past_names, self.present_names, strict=True)
            for past, present in zip(past_pair, present_pair, strict=True)
        }


def position_ids(attention_mask: np.ndarray, seq: int) -> np.ndarray:
    """Hugging Face generate()'s positions for the last `seq` slots of `attention_mask`."""
    mask = np.asarray(attention_mask, dtype=np.int64)
    positions = np.cumsum(mask, axis=-1) - 1
    positions = np.where(mask == 0, 1, positions)
    return positions[:, -seq:].astype(np.int64)


def _layered(names: dict[str, Any], pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    found: dict[int, dict[str, str]] = {}
    for name in names:
        match = pattern.match(name)
        if match:
            found.setdefault(int(match.group(1)), {})[match.group(2)] = name
    layers = []
    for index in range(len(found)):
        pair = found.get(index, {})
        if set(pair) != {"key", "value"}:
            return []  # a gap or a half pair: not the layout this module knows
        layers.append((pair["key"], pair["value"]))
    return layers
