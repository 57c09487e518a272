"""Interleaved latency measurement: candidates take turns, so a noisy machine slows them alike.

On a small shared machine (2 cores here) background load comes and goes over seconds. Timing
candidate A for 100 runs and then B for 100 runs lets that drift land on one of them and skews
their ratio. `interleaved` runs one block of iterations of each candidate in turn (round robin,
starting point rotated every round so no candidate always runs right after the same other one),
so each candidate sees the same mix of quiet and busy moments and their ratios hold.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from pipeline.config.base import shape_key


def interleaved(
    candidates: Mapping[str, Callable[[], Any]],
    *,
    warmup: int,
    iters: int | Mapping[str, int],
    block: int = 1,
    settle: int = 0,
    progress: Any = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Time every candidate `iters` times (milliseconds per call), taking turns block by block.

    `iters` may also name each candidate's own count: one with fewer runs than the most takes
    smaller turns (`turn_block`) in the same rounds, so its runs still spread over the whole
    measurement rather than bunching at its start. Warm-up calls are interleaved the same way and
    not recorded. `settle` untimed calls open every turn: a runtime whose thread pool still spins
    (or sleeps) after the previous candidate's run would otherwise charge that hand-over to the
    first timed call. The garbage collector is paused while timing (as timeit does). `progress` (a
    tqdm bar or None) is advanced by one per timed call.
    """
    if not candidates:
        return {}
    names = list(candidates)
    counts = {name: iters[name] if isinstance(iters, Mapping) else iters for name in names}
    if min(counts.values()) < 1 or warmup < 0 or block < 1 or settle < 0:
        raise ValueError(
            f"interleaved: need iters >= 1, warmup >= 0, block >= 1, settle >= 0 "
            f"(got {iters}, {warmup}, {block}, {settle})"
        )
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    most = max(counts.values())
    rounds = math.ceil(most / block)
    blocks = {name: turn_block(counts[name], most, block) for name in names}
    gc.collect()
    collecting = gc.isenabled()
    gc.disable()  # like timeit: no collector pauses inside timed calls
    try:
        for index in range(rounds):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                runs = min(blocks[name], counts[name] - len(times[name]))
                if runs <= 0:
                    continue
                fn = candidates[name]
                for _ in range(settle):
                    fn()
                for _ in range(runs):
                    started = clock()
                    fn()
                    times[name].append((clock() - started) * 1e3)
                if progress is not None:
                    progress.update(runs)
    finally:
        if collecting:
            gc.enable()
    return times


def turn_block(count: int, most: int, block: int) -> int:
    """The turn size of a candidate timed `count` times where the most-timed one runs `most` times
    in turns of `block`: `block` for the most-timed, and for one timed fewer times the size that
    spreads its runs over the same number of turns (the turns its statistics resample)."""
    if count >= most:
        return block
    return math.ceil(count / math.ceil(most / block))


def summarize(times_ms: Sequence[float], batch: int) -> dict[str, float]:
    """p50/p90/p99/mean/min latency (ms) and throughput (examples per second) of timed calls."""
    array = np.asarray(times_ms, dtype=np.float64)
    if array.size == 0:
        raise ValueError("summarize: no timings")
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    mean = float(array.mean())
    return {
        "p50_ms": round(float(p50), 4),
        "p90_ms": round(float(p90), 4),
        "p99_ms": round(float(p99), 4),
        "mean_ms": round(mean, 4),
        "min_ms": round(float(array.min()), 4),
        "iters": int(array.size),
        "throughput_per_s": round(batch * 1e3 / mean, 3) if mean > 0 else None,
    }


def speedups(
    reference: Mapping[str, Mapping[str, float]], candidate: Mapping[str, Mapping[str, float]]
) -> dict[str, float]:
    """Per shape key: reference p50 / candidate p50 (> 1 means the candidate is faster)."""
    ratios = {}
    for key, stats in candidate.items():
        if key in reference and stats.get("p50_ms"):
            ratios[key] = round(float(reference[key]["p50_ms"]) / float(stats["p50_ms"]), 4)
    return ratios


def time_shapes(
    runners: Mapping[str, Any],
    shapes: Sequence[tuple[int, int]],
    calls_of: Callable[[Any, int, int], Mapping[str, Callable[[], Any]]],
    *,
    warmup: int,
    iters: int,
    block: int,
    settle: int,
    runs_of: Callable[[int], Mapping[str, int]] | None = None,
    progress: Any = None,
    on_shape: Callable[[str, dict[str, dict[str, list[float]]]], None] | None = None,
    on_retry: Callable[[str, int, list[str]], None] | None = None,
    max_rounds: int = 1,
    max_other_cpu: float = math.inf,
    max_turn_spread: float = math.inf,
) -> tuple[dict[str, dict[str, dict[str, list[float]]]], dict[str, dict[str, Any]]]:
    """Milliseconds of every runner's timed calls at every shape, and how trustworthy each shape's
    timing is: ({runner: {shape key: {call: ms}}}, {shape key: quality record}).

    `calls_of(runner, batch, seq)` gives the runner's timed calls at one shape ("" for a plain forward;
    a decoder has "prefill" and "decode"); `runs_of(seq)` gives their timed runs at that sequence length
    ({call: runs}, at most `iters`; a call it does not name runs `iters` times): a call timed fewer
    times (a decoder's 10x costlier prefill) takes turns of `turn_block` runs. All calls of all runners
    at one shape take turns in one `interleaved` round robin, so a drift in background load hits them
    alike. A round disturbed by other CPU work, a dispersion jump, or (across shapes) an implausible
    ordering is timed again, up to `max_rounds` rounds per shape; the quality record says what was seen.
    When the only complaint repeats, the same candidates' turns spreading again on an otherwise quiet
    machine, that spread is the candidates' own (measured: a SmolLM2 INT8 decode step spread 1.6x in
    every round): the shape is not timed a third time, and the spread stays in the record.
    """
    from pipeline.bench.interference import CpuMonitor, disturbed, implausible_orderings, quality_record
    from pipeline.bench.stats import turn_spread

    times: dict[str, dict[str, dict[str, list[float]]]] = {name: {} for name in runners}
    quality: dict[str, dict[str, Any]] = {}

    def one_round(batch: int, seq: int, round_index: int) -> tuple[list[str], set[str] | None]:
        """Why the round cannot be trusted, and the candidates whose turns spread (None: other
        processes were busy, so any spread may be theirs)."""
        key = shape_key(batch, seq)
        runs = runs_of(seq) if runs_of is not None else {}
        calls: dict[str, Callable[[], Any]] = {}
        counts: dict[str, int] = {}
        for name, runner in runners.items():
            for call, fn in calls_of(runner, batch, seq).items():
                calls[f"{name}\x00{call}"] = fn
                counts[f"{name}\x00{call}"] = min(iters, runs.get(call, iters))
        most = max(counts.values(), default=iters)
        with CpuMonitor() as cpu:
            measured = interleaved(
                calls, warmup=warmup, iters=counts, block=block, settle=settle, progress=progress
            )
        for label, ms in measured.items():
            name, call = label.split("\x00")
            times[name].setdefault(key, {})[call] = ms
        # Only calls timed in full turns judge the round: a call timed fewer times has fewer runs
        # a turn, whose medians spread by chance alone (SmolLM2's fp32 prefill in turns of 2:
        # 1.57x on a quiet machine), and any disturbance shows in the full turns beside them.
        spreads = {
            label.replace("\x00", ":").rstrip(":"): turn_spread(ms, block)
            for label, ms in measured.items()
            if counts[label] == most
        }
        reasons = disturbed(cpu, spreads, max_other_cpu=max_other_cpu, max_turn_spread=max_turn_spread)
        quality[key] = quality_record(cpu, round_index, reasons, max_other_cpu=max_other_cpu)
        if quality[key]["interfered"]:  # other processes' load: any spread may be theirs
            return reasons, None
        return reasons, {name for name, spread in spreads.items() if spread > max_turn_spread}

    for batch, seq in shapes:
        key = shape_key(batch, seq)
        spread_before: set[str] | None = None
        for round_index in range(1, max_rounds + 1):
            reasons, spread_now = one_round(batch, seq, round_index)
            if not reasons or round_index == max_rounds:
                break
            if spread_now and spread_before is not None and spread_now <= spread_before:
                break  # the same candidates spread again on a quiet machine: their own variance
            spread_before = spread_now
            if on_retry is not None:
                on_retry(key, round_index, reasons)
        if on_shape is not None:
            on_shape(key, {name: times[name][key] for name in runners})

    def orderings() -> dict[tuple[int, int], list[str]]:
        calls = {call for per_shape in times.values() for per_call in per_shape.values() for call in per_call}
        p50 = {  # a call timed at some shapes only (a decoder's prefill) is compared where it was
            f"{name}:{call}".rstrip(":"): {
                (b, s): float(np.median(times[name][shape_key(b, s)][call]))
                for b, s in shapes
                if call in times[name][shape_key(b, s)]
            }
            for name in runners
            for call in calls
        }
        found: dict[tuple[int, int], list[str]] = {}
        for line in implausible_orderings(p50):
            for b, s in shapes:
                if f"at b{b}_s{s}" in line:
                    found.setdefault((b, s), []).append(line)
        return found

    for _ in range(max_rounds):
        bad = orderings()
        retry = [shape for shape in bad if quality[shape_key(*shape)]["rounds"] < max_rounds]
        if not retry:
            break
        for batch, seq in retry:
            key = shape_key(batch, seq)
            if on_retry is not None:
                on_retry(key, quality[key]["rounds"], bad[(batch, seq)])
            one_round(batch, seq, quality[key]["rounds"] + 1)
    for (batch, seq), lines in orderings().items():
        record = quality[shape_key(batch, seq)]
        record["reasons"] = record["reasons"] + lines
        record["interfered"] = True
    return times, quality


def geometric_mean(values: Sequence[float]) -> float | None:
    values = [float(v) for v in values if v is not None and v > 0]
    if not values:
        return None
    return float(math.exp(sum(math.log(v) for v in values) / len(values)))


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Pin PyTorch's intra-op thread count inside the block, restoring it afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
