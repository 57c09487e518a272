"""Other work competing for the CPU while timing: detected, re-measured, never silently trusted.

On a shared machine a competing job can make even interleaved ratios wrong by several times (it
preempts multi-threaded runtimes most: measured here, PyTorch 418 ms at batch 1 and 101 ms at
batch 8 under a 2-thread load, 25.5x "speed-up" instead of 5.95x). Three signs are checked per
timing round: CPU time used by other processes and stolen by the hypervisor (/proc/stat minus
this process, in cores), a dispersion jump (a candidate's turns far apart), and an implausible
ordering (a candidate slower at a smaller batch than at a larger one, at the same sequence length).
"""

from __future__ import annotations

import os
import time
from typing import Any


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def load_notes(before: float | None, after: float | None, cores: int) -> list[str]:
    """A warning for the report when other work competed for the CPU during timing."""
    busiest = max((v for v in (before, after) if v is not None), default=None)
    if busiest is None or busiest <= cores * 1.25:
        return []
    return [
        f"the machine was busy while timing (1-minute load average up to {busiest:.1f} on {cores} cores): "
        "absolute times are unreliable and multi-threaded runtimes lose most to preemption, so even the "
        "interleaved ratios may be skewed; re-run on a quiet machine for numbers to quote"
    ]


def _machine_busy() -> tuple[int, int] | None:
    """(busy jiffies of all CPUs, stolen jiffies) from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return user + nice + system + irq + softirq + steal, steal


def _own_jiffies() -> int:
    """User + system time of this process, all its threads, in clock ticks."""
    times = os.times()
    return int(round((times.user + times.system) * os.sysconf("SC_CLK_TCK")))


class CpuMonitor:
    """`with CpuMonitor() as cpu: ...` then `cpu.other_cores`: the average number of cores that
    other processes (and the hypervisor's steal) kept busy during the block; None where unknown."""

    def __enter__(self) -> CpuMonitor:
        self.other_cores: float | None = None
        self.steal_cores: float | None = None
        self._start = (time.perf_counter(), _machine_busy(), _own_jiffies())
        return self

    def __exit__(self, *exc: object) -> None:
        wall0, busy0, own0 = self._start
        wall, busy, own = time.perf_counter() - wall0, _machine_busy(), _own_jiffies()
        if busy0 is None or busy is None or wall <= 0:
            return
        ticks = os.sysconf("SC_CLK_TCK") * wall
        self.other_cores = round(max(0.0, (busy[0] - busy0[0] - (own - own0)) / ticks), 3)
        self.steal_cores = round(max(0.0, (busy[1] - busy0[1]) / ticks), 3)


def implausible_orderings(p50: dict[str, dict[tuple[int, int], float]]) -> list[str]:
    """Candidates slower at a smaller batch than at a larger one, same sequence length:
    {candidate: {(batch, seq): p50 ms}} -> one line per finding."""
    found = []
    for name, by_shape in p50.items():
        for (batch, seq), ms in by_shape.items():
            for (other_batch, other_seq), other_ms in by_shape.items():
                if other_seq == seq and other_batch > batch and ms > other_ms:
                    found.append(
                        f"{name}: {ms:.2f} ms at b{batch}_s{seq} > {other_ms:.2f} ms at "
                        f"b{other_batch}_s{seq} (a smaller batch cannot take longer)"
                    )
    return found


def disturbed(
    monitor: CpuMonitor, spreads: dict[str, float], *, max_other_cpu: float, max_turn_spread: float
) -> list[str]:
    """Why one timing round cannot be trusted (empty: it can)."""
    reasons = []
    if monitor.other_cores is not None and monitor.other_cores > max_other_cpu:
        reasons.append(
            f"other processes used {monitor.other_cores:.2f} cores while timing (limit {max_other_cpu:g})"
        )
    jumpy = {name: spread for name, spread in spreads.items() if spread > max_turn_spread}
    if jumpy:
        worst = max(jumpy, key=jumpy.get)
        reasons.append(f"turn medians of {worst} spread {jumpy[worst]:.2f}x (limit {max_turn_spread:g}x)")
    return reasons


def quality_record(
    monitor: CpuMonitor, rounds: int, reasons: list[str], *, max_other_cpu: float
) -> dict[str, Any]:
    """What the report says about one shape's timing. Only other processes' CPU use marks it
    interfered (its speed verdicts then inconclusive): a candidate's own unsteady turns are timed
    again, and what stays unsteady widens its paired-bootstrap interval, which the verdict reads
    (measured on this 2-core VM, a quiet machine's fp32 turns spread up to 1.65x)."""
    busy = monitor.other_cores is not None and monitor.other_cores > max_other_cpu
    return {
        "rounds": rounds,
        "other_cores": monitor.other_cores,
        "steal_cores": monitor.steal_cores,
        "interfered": busy,
        "reasons": reasons if busy else [],
        "unsteady": [] if busy else reasons,
    }
