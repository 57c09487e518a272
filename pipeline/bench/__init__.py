"""Benchmark harness: interleaved latency of several callables, percentiles, peak memory.

    from pipeline.bench import interleaved, summarize, PeakRSS

    times = interleaved({"pytorch": run_torch, "int8": run_ort}, warmup=5, iters=50)
    stats = {name: summarize(ms, batch=8) for name, ms in times.items()}   # p50/p90/p99, throughput
    with PeakRSS() as mem:
        session = load()
    mem.delta_bytes

Everything here is light (numpy, psutil); the callables bring their own runtimes.
"""

from pipeline.bench.latency import (
    geometric_mean,
    interleaved,
    speedups,
    summarize,
    time_shapes,
    torch_threads,
)
from pipeline.bench.memory import PeakRSS, current_rss

__all__ = [
    "PeakRSS",
    "current_rss",
    "geometric_mean",
    "interleaved",
    "time_shapes",
    "speedups",
    "summarize",
    "torch_threads",
]
