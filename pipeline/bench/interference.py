"""Other work competing for the CPU while timing: detected, reported, never silently trusted."""

from __future__ import annotations

import os


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
