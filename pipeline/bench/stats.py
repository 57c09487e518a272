"""Speed-up ratios with their uncertainty, from the interleaved turns.

`interleaved` runs each candidate in turns of `block` consecutive timed runs, every candidate once
per round, so run j of any candidate belongs to turn j // block and turn t of two candidates ran
in the same round (the same stretch of machine weather). A speed-up's confidence interval is a
paired bootstrap over those turns: resample turn indices with replacement, take the runs of the
chosen turns of both candidates, and compute the ratio of their medians; the interval is the
percentile range of those ratios. A drift of the machine's speed between rounds widens it; a
competing load that slows every round alike does not, which is why interference is detected
separately (pipeline.bench.interference).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def turns(times_ms: Sequence[float], block: int) -> list[np.ndarray]:
    """The runs of each turn (consecutive groups of `block`; the last may be shorter)."""
    array = np.asarray(times_ms, dtype=np.float64)
    return [array[i : i + block] for i in range(0, array.size, block)]


def turn_medians(times_ms: Sequence[float], block: int) -> list[float]:
    return [round(float(np.median(t)), 4) for t in turns(times_ms, block)]


def turn_spread(times_ms: Sequence[float], block: int) -> float:
    """Slowest over fastest turn median (1.0 = every turn alike)."""
    medians = [m for m in turn_medians(times_ms, block) if m > 0]
    return max(medians) / min(medians) if medians else 1.0


def ratio_interval(
    reference_ms: Sequence[float],
    candidate_ms: Sequence[float],
    block: int,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """median(reference) / median(candidate) and its bootstrap interval over paired turns.

    Returns {"ratio", "low", "high", "confidence", "turns"}; with a single turn the interval is
    that ratio itself (there is nothing to resample) and `turns` says so.
    """
    ref, cand = turns(reference_ms, block), turns(candidate_ms, block)
    paired = min(len(ref), len(cand))
    if paired == 0:
        raise ValueError("ratio_interval: no timings")
    ref, cand = ref[:paired], cand[:paired]
    point = float(np.median(np.concatenate(ref)) / np.median(np.concatenate(cand)))
    if paired == 1:
        return {
            "ratio": round(point, 4),
            "low": round(point, 4),
            "high": round(point, 4),
            "confidence": confidence,
            "turns": 1,
        }
    rng = np.random.default_rng(seed)
    ratios = np.empty(resamples)
    for index in range(resamples):
        pick = rng.integers(0, paired, size=paired)
        ratios[index] = np.median(np.concatenate([ref[i] for i in pick])) / np.median(
            np.concatenate([cand[i] for i in pick])
        )
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    return {
        "ratio": round(point, 4),
        "low": round(float(low), 4),
        "high": round(float(high), 4),
        "confidence": confidence,
        "turns": paired,
    }


def verdict(interval: dict[str, Any] | None, limit: float, *, interfered: bool = False) -> str:
    """ "pass" when the whole interval is at or above `limit`, "fail" when it is entirely below,
    "inconclusive" when it straddles the limit or the timing was interfered with."""
    if interval is None or interfered:
        return "inconclusive"
    if interval["low"] >= limit:
        return "pass"
    if interval["high"] < limit:
        return "fail"
    return "inconclusive"
