"""Speed-up intervals (paired bootstrap over interleaved turns), verdicts, interference detection."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.bench.interference import disturbed, implausible_orderings
from pipeline.bench.stats import ratio_interval, turn_medians, turn_spread, verdict


class _Monitor:
    def __init__(self, other_cores):
        self.other_cores, self.steal_cores = other_cores, 0.0


def _series(medians, block, jitter=0.01, seed=0):
    """`block` runs per turn around each turn's median (a little noise)."""
    rng = np.random.default_rng(seed)
    return [float(m * (1 + jitter * rng.standard_normal())) for m in medians for _ in range(block)]


def test_turns_and_spread():
    times = [1, 1, 1, 2, 2, 2, 4]
    assert turn_medians(times, 3) == [1.0, 2.0, 4.0]
    assert turn_spread(times, 3) == 4.0
    assert turn_spread([5.0] * 6, 3) == 1.0


def test_interval_holds_the_true_ratio_and_narrows_with_a_steady_machine():
    block = 10
    ref = _series([10.0] * 8, block, seed=1)
    cand = _series([5.0] * 8, block, seed=2)
    steady = ratio_interval(ref, cand, block)
    assert steady["turns"] == 8 and steady["low"] <= 2.0 <= steady["high"]
    assert steady["high"] - steady["low"] < 0.05
    # The machine drifts between rounds (both candidates alike within a round, not alike across).
    drift = [10.0, 14.0, 9.0, 16.0, 10.0, 13.0, 9.5, 15.0]
    ratio_drift = [1.0, 1.3, 0.8, 1.4, 1.0, 1.2, 0.9, 1.5]  # the candidate suffers more in slow rounds
    ref_d = _series(drift, block, seed=3)
    cand_d = _series([d / 2 * r for d, r in zip(drift, ratio_drift, strict=True)], block, seed=4)
    drifting = ratio_interval(ref_d, cand_d, block)
    assert drifting["high"] - drifting["low"] > 5 * (steady["high"] - steady["low"])
    assert ratio_interval(ref, cand, block) == steady  # seeded: the same report twice


def test_one_turn_has_no_interval_to_resample():
    single = ratio_interval([4.0, 4.0], [2.0, 2.0], block=10)
    assert single == {"ratio": 2.0, "low": 2.0, "high": 2.0, "confidence": 0.95, "turns": 1}
    with pytest.raises(ValueError, match="no timings"):
        ratio_interval([], [], block=10)


def test_verdict_passes_fails_or_says_it_cannot_tell():
    assert verdict({"low": 1.6, "high": 2.0}, 1.5) == "pass"
    assert verdict({"low": 1.0, "high": 1.4}, 1.5) == "fail"
    assert verdict({"low": 1.4, "high": 1.7}, 1.5) == "inconclusive"  # straddles the limit
    assert verdict({"low": 3.0, "high": 3.1}, 1.5, interfered=True) == "inconclusive"
    assert verdict(None, 1.5) == "inconclusive"


def test_a_round_is_disturbed_by_other_processes_or_jumpy_turns():
    assert disturbed(_Monitor(0.1), {"a": 1.1}, max_other_cpu=0.25, max_turn_spread=1.5) == []
    busy = disturbed(_Monitor(0.9), {"a": 1.1}, max_other_cpu=0.25, max_turn_spread=1.5)
    assert busy == ["other processes used 0.90 cores while timing (limit 0.25)"]
    jumpy = disturbed(_Monitor(None), {"a": 1.1, "b": 2.0}, max_other_cpu=0.25, max_turn_spread=1.5)
    assert jumpy == ["turn medians of b spread 2.00x (limit 1.5x)"]


def test_a_smaller_batch_cannot_take_longer():
    p50 = {"x": {(1, 64): 30.0, (8, 64): 20.0, (8, 128): 10.0}, "y": {(1, 64): 5.0, (8, 64): 20.0}}
    assert implausible_orderings(p50) == [
        "x: 30.00 ms at b1_s64 > 20.00 ms at b8_s64 (a smaller batch cannot take longer)"
    ]


def test_only_other_processes_load_makes_a_shape_interfered():
    """Unsteady turns of a candidate are re-timed and then carried by the interval; other
    processes' CPU use makes the speed verdicts inconclusive."""
    from pipeline.bench.interference import quality_record

    spread = ["turn medians of fp32 spread 1.63x (limit 1.5x)"]
    quiet = quality_record(_Monitor(0.05), 3, spread, max_other_cpu=0.25)
    assert quiet["interfered"] is False and quiet["unsteady"] == spread and quiet["reasons"] == []
    busy_reasons = ["other processes used 1.20 cores while timing (limit 0.25)", *spread]
    busy = quality_record(_Monitor(1.2), 3, busy_reasons, max_other_cpu=0.25)
    assert busy["interfered"] is True and busy["reasons"] == busy_reasons and busy["unsteady"] == []
    clean = quality_record(_Monitor(None), 1, [], max_other_cpu=0.25)
    assert clean["interfered"] is False and clean["rounds"] == 1


@pytest.mark.parametrize(
    ("spreads_per_round", "rounds"),
    [
        ([{"a": 2.0}, {"a": 2.0}, {"a": 2.0}], 2),  # the same candidate again: its own variance
        ([{"a": 2.0}, {"b": 2.0}, {"b": 2.0}], 3),  # another candidate: a disturbance moving about
        ([{"a": 2.0}, {}], 2),  # steady once re-timed
        ([{}], 1),
    ],
)
def test_a_repeated_spread_of_the_same_candidate_is_not_timed_a_third_time(
    monkeypatch, spreads_per_round, rounds
):
    """A round whose only complaint is a candidate's turn spread is timed again once; when the
    same candidates spread again on a quiet machine, a third round would only cost time."""
    import pipeline.bench.interference as interference
    import pipeline.bench.stats as stats
    from pipeline.bench import time_shapes

    scripted = iter(spreads_per_round)
    queue: list[float] = []  # this round's spreads of a then b (the order the round measures them)

    class QuietMonitor:
        other_cores, steal_cores = 0.0, 0.0

        def __enter__(self):
            spreads = next(scripted)
            queue[:] = [spreads.get("a", 1.0), spreads.get("b", 1.0)]
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(interference, "CpuMonitor", QuietMonitor)
    monkeypatch.setattr(stats, "turn_spread", lambda ms, block: queue.pop(0))
    runners = {"a": None, "b": None}
    _, quality = time_shapes(
        runners,
        [(1, 8)],
        lambda runner, batch, seq: {"": lambda: None},
        warmup=0,
        iters=2,
        block=1,
        settle=0,
        max_rounds=3,
        max_other_cpu=0.25,
        max_turn_spread=1.5,
    )
    assert quality["b1_s8"]["rounds"] == rounds


@pytest.mark.parametrize(("jumpy_call", "rounds"), [("prefill", 1), ("decode", 2)])
def test_only_calls_timed_in_full_turns_judge_a_round(monkeypatch, jumpy_call, rounds):
    """A call timed fewer times (runs_of: a decoder's prefill) takes smaller turns in the same
    rounds; their medians spread by chance alone, so only the full-turn calls can send a round
    back (the prefill's spread alone does not; the decode step's does)."""
    import pipeline.bench.interference as interference
    import pipeline.bench.stats as stats
    from pipeline.bench import time_shapes

    class QuietMonitor:
        other_cores, steal_cores = 0.0, 0.0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    # Only the jumpy call's runs spread (2 runs = the prefill's count, 4 = the decode step's).
    runs_of_jumpy = 2 if jumpy_call == "prefill" else 4
    monkeypatch.setattr(interference, "CpuMonitor", QuietMonitor)
    monkeypatch.setattr(stats, "turn_spread", lambda ms, block: 3.0 if len(ms) == runs_of_jumpy else 1.0)
    times, quality = time_shapes(
        {"a": None},
        [(1, 8)],
        lambda runner, batch, seq: {"prefill": lambda: None, "decode": lambda: None},
        warmup=0,
        iters=4,
        block=2,
        settle=0,
        runs_of=lambda seq: {"prefill": 2},
        max_rounds=3,
        max_other_cpu=0.25,
        max_turn_spread=1.5,
    )
    assert quality["b1_s8"]["rounds"] == rounds
    assert len(times["a"]["b1_s8"]["prefill"]) == 2 and len(times["a"]["b1_s8"]["decode"]) == 4
