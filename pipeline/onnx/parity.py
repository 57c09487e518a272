"""The one parity grid: an ONNX session against a reference on a grid of inputs, for every task.

What differs between tasks is supplied as `ParityCase`s by the task's I/O adapter
(pipeline.tasks): the feeds of each case, which positions of each output are real (padded
positions are excluded: their values are unused and legitimately differ between
implementations), which group an output belongs to (a decoder reports logits and present
key/values apart) and which outputs are scores (argmax agreement and cosine similarity are
computed on those). Any NaN/inf anywhere in the checked outputs fails, padded or not: a NaN in a
padded cache slot poisons every later step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import ParityError

Reference = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class ParityCase:
    """One input of the grid.

    `describe`: what the case is, for the report and error messages ({"batch": 2, "seq": 37}).
    `valid`: output name -> boolean mask broadcastable to the output's leading dims (positions
    that count); outputs without an entry are compared everywhere.
    `scored`: outputs whose last axis holds scores or features (argmax agreement, cosine); a
    mask in `valid` restricts those too.
    `group`: output name -> group label; each group's max |diff| is reported on its own.
    """

    describe: dict[str, int]
    feeds: dict[str, np.ndarray]
    valid: dict[str, np.ndarray] = field(default_factory=dict)
    scored: tuple[str, ...] | None = None  # None: every output with a last axis > 1
    group: dict[str, str] = field(default_factory=dict)

    def where(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.describe.items())


def _applies(mask: np.ndarray | None, shape: tuple[int, ...]) -> bool:
    """A mask counts for an output whose leading dims are exactly the mask's shape (per-token
    outputs); an output of another shape (one row per example) is compared everywhere."""
    return mask is not None and tuple(shape[: np.ndim(mask)]) == np.shape(mask)


def _masked(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """`values` at the positions `mask` marks real (all of them when the mask does not apply)."""
    if not _applies(mask, values.shape):
        return values.reshape(-1)
    mask = np.asarray(mask, dtype=bool)
    return values[np.broadcast_to(mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim)), values.shape)]


def parity_grid(
    reference: Reference,
    session: Any,
    cases: Sequence[ParityCase],
    atol: float,
    *,
    label: str = "ONNX model",
    min_argmax_agreement: float | None = None,
    min_cosine_mean: float | None = None,
    raise_on_atol: bool = True,
) -> dict[str, Any]:
    """Compare `session` with `reference(feeds) -> {output name: array}` on every case.

    Returns {atol, max_abs_diff, max_abs_diff_<group>..., argmax_agreement, cosine_mean,
    cosine_min, cases}; raises ParityError above `atol` (unless raise_on_atol is False), on
    NaN/inf, on a shape or output mismatch, or below `min_argmax_agreement` / `min_cosine_mean`.
    """
    names = [o.name for o in session.get_outputs()]
    inputs = {i.name for i in session.get_inputs()}
    per_case: list[dict[str, Any]] = []
    worst: dict[str, float] = {}
    agree = agree_total = cosine_count = 0
    cosine_sum, cosine_min = 0.0, 1.0
    for case in cases:
        feeds = {k: v for k, v in case.feeds.items() if k in inputs}
        expected = reference(feeds)
        missing = [n for n in names if n not in expected]
        if missing:
            raise ParityError(f"{label}: the reference has no output {missing[0]!r}")
        actual = dict(zip(names, session.run(names, feeds), strict=True))
        diffs: dict[str, float] = {}
        for name in names:
            exp = np.asarray(expected[name], dtype=np.float64)
            act = np.asarray(actual[name], dtype=np.float64)
            where = f"output {name!r} at {case.where()}"
            if exp.shape != act.shape:
                raise ParityError(f"{label}: {where} has shape {act.shape}, reference {exp.shape}")
            if not np.all(np.isfinite(act)):
                raise ParityError(f"{label}: {where} has NaN/inf")
            mask = case.valid.get(name)
            diff = _masked(np.abs(exp - act), mask)
            group = case.group.get(name, "")
            diffs[group] = max(diffs.get(group, 0.0), float(diff.max()) if diff.size else 0.0)
            scored = name in case.scored if case.scored is not None else True
            if scored and exp.ndim >= 2 and exp.shape[-1] > 1:
                same = np.argmax(exp, axis=-1) == np.argmax(act, axis=-1)
                dot = (exp * act).sum(-1)
                norms = np.linalg.norm(exp, axis=-1) * np.linalg.norm(act, axis=-1)
                cosine = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 1.0)
                if _applies(mask, same.shape) and np.ndim(mask) == same.ndim:
                    same, cosine = same[np.asarray(mask, bool)], cosine[np.asarray(mask, bool)]
                agree += int(same.sum())
                agree_total += int(same.size)
                if cosine.size:
                    cosine_min = min(cosine_min, float(cosine.min()))
                    cosine_sum += float(cosine.sum())
                    cosine_count += int(cosine.size)
        record: dict[str, Any] = {**case.describe, "max_abs_diff": max(diffs.values(), default=0.0)}
        record.update({f"max_abs_diff_{g}": v for g, v in diffs.items() if g})
        per_case.append(record)
        for group, value in diffs.items():
            worst[group] = max(worst.get(group, 0.0), value)
    overall = max(worst.values(), default=0.0)
    agreement = agree / agree_total if agree_total else 1.0
    cosine_mean = cosine_sum / cosine_count if cosine_count else 1.0
    result: dict[str, Any] = {
        "atol": None if math.isinf(atol) else atol,
        "max_abs_diff": overall,
        **{f"max_abs_diff_{g}": v for g, v in worst.items() if g},
        "argmax_agreement": agreement,
        "cosine_mean": round(cosine_mean, 6),
        "cosine_min": round(cosine_min, 6),
        "cases": per_case,
    }
    if raise_on_atol and overall > atol:
        bad = max(per_case, key=lambda c: c["max_abs_diff"])
        groups = [g for g in worst if g and bad.get(f"max_abs_diff_{g}") == bad["max_abs_diff"]]
        what = f" ({groups[0]})" if groups else ""
        at = ", ".join(f"{k} {v}" for k, v in bad.items() if not k.startswith("max_abs_diff"))
        raise ParityError(f"{label}: max |diff| {overall:.3g}{what} exceeds atol {atol:g} (worst at {at})")
    if min_argmax_agreement is not None and agreement < min_argmax_agreement:
        raise ParityError(
            f"{label}: argmax agreement {agreement:.3f} is below the minimum {min_argmax_agreement:g}"
        )
    if min_cosine_mean is not None and cosine_mean < min_cosine_mean:
        raise ParityError(
            f"{label}: mean output cosine similarity {cosine_mean:.4f} is below the minimum "
            f"{min_cosine_mean:g}"
        )
    return result


def session_reference(session: Any) -> Reference:
    """Reference outputs from another ONNX session (e.g. the fp32 input of a lossy stage)."""
    names = [o.name for o in session.get_outputs()]
    inputs = {i.name for i in session.get_inputs()}

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = session.run(names, {k: v for k, v in feeds.items() if k in inputs})
        return dict(zip(names, outputs, strict=True))

    return run
