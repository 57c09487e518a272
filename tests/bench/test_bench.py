"""The latency harness: interleaving order, percentiles, throughput, ratios, thread pinning, memory."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from pipeline.bench import PeakRSS, geometric_mean, interleaved, speedups, summarize
from pipeline.config import parse_shape_key, shape_key


def test_shape_keys_round_trip_and_reject_garbage():
    assert shape_key(8, 128) == "b8_s128"
    assert parse_shape_key("b8_s128") == (8, 128)
    for bad in ("8x128", "b8s128", "b_s1", ""):
        with pytest.raises(ValueError, match="shape key like 'b1_s64'"):
            parse_shape_key(bad)


def test_summarize_percentiles_and_throughput_hand_checked():
    stats = summarize([float(v) for v in range(1, 101)], batch=4)  # 1..100 ms
    assert stats["p50_ms"] == 50.5
    assert stats["p90_ms"] == 90.1
    assert stats["p99_ms"] == 99.01
    assert stats["mean_ms"] == 50.5 and stats["min_ms"] == 1.0 and stats["iters"] == 100
    assert stats["throughput_per_s"] == pytest.approx(4 * 1000 / 50.5, rel=1e-4)
    with pytest.raises(ValueError):
        summarize([], batch=1)


def test_interleaved_takes_turns_rotates_and_skips_warmup():
    calls: list[str] = []
    ticks = iter(range(10_000))
    candidates = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = interleaved(candidates, warmup=2, iters=3, clock=lambda: next(ticks) / 1000)
    assert calls[:6] == list("abcabc")  # warm-up, interleaved, not recorded
    assert calls[6:] == list("abc") + list("bca") + list("cab")  # start rotates every round
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t == pytest.approx(1.0) for v in times.values() for t in v)  # one tick = 1 ms
    assert gc.isenabled()  # paused only while timing


def test_interleaved_blocks_and_progress():
    calls: list[str] = []

    class Bar:
        n = 0

        def update(self, k):
            Bar.n += k

    candidates = {name: (lambda name=name: calls.append(name)) for name in "ab"}
    times = interleaved(candidates, warmup=0, iters=5, block=2, progress=Bar())
    assert calls == list("aabbbbaaab")
    assert len(times["a"]) == len(times["b"]) == 5 and Bar.n == 10
    with pytest.raises(ValueError):
        interleaved(candidates, warmup=0, iters=0)


def test_fewer_runs_spread_over_the_same_turns():
    calls: list[str] = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in "ab"}
    # a: 6 runs in turns of 3 (2 rounds); b: 3 runs, so turns of 2 then 1, one per round.
    times = interleaved(candidates, warmup=0, iters={"a": 6, "b": 3}, block=3, settle=1)
    assert calls == list("aaaa" + "bbb" + "bb" + "aaaa")  # a settle call opens each turn
    assert len(times["a"]) == 6 and len(times["b"]) == 3
    # A candidate whose runs are done takes no turn (and no settle call) in later rounds.
    calls.clear()
    interleaved(candidates, warmup=0, iters={"a": 6, "b": 1}, block=2)
    assert calls == list("aab" + "aa" + "aa")
    with pytest.raises(ValueError):
        interleaved(candidates, warmup=0, iters={"a": 2, "b": 0})


def test_settle_runs_open_every_turn_untimed():
    calls: list[str] = []
    ticks = iter(range(1000))
    candidates = {name: (lambda name=name: calls.append(name)) for name in "ab"}
    times = interleaved(candidates, warmup=0, iters=4, block=2, settle=1, clock=lambda: next(ticks))
    # Each turn: one settle call, then `block` timed calls; order rotates every round.
    assert calls == list("aaabbbbbbaaa")
    assert len(times["a"]) == len(times["b"]) == 4
    assert all(ms == 1000.0 for ms in times["a"] + times["b"])  # one clock tick per timed call only


def test_speedups_are_p50_ratios_and_geometric_mean():
    ref = {"b1_s64": {"p50_ms": 40.0}, "b8_s64": {"p50_ms": 200.0}}
    cand = {"b1_s64": {"p50_ms": 10.0}, "b8_s64": {"p50_ms": 80.0}, "b2_s8": {"p50_ms": 1.0}}
    assert speedups(ref, cand) == {"b1_s64": 4.0, "b8_s64": 2.5}
    assert geometric_mean([4.0, 1.0]) == pytest.approx(2.0)
    assert geometric_mean([]) is None


def test_torch_threads_pins_and_restores():
    torch = pytest.importorskip("torch")
    from pipeline.bench import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_peak_rss_sees_a_transient_allocation():
    with PeakRSS() as outer:
        block = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB, touched
        del block
    assert outer.delta_bytes > 48 * 1024 * 1024
    assert outer.method in ("vmhwm", "sampled")
    with PeakRSS() as quiet:
        sum(range(1000))
    assert quiet.delta_bytes < 16 * 1024 * 1024
