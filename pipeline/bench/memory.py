"""Peak resident memory of a block of code, in this process (no tracemalloc: native allocations
of ONNX Runtime and PyTorch are what matter).

Linux: the kernel keeps the process's RSS high-water mark (VmHWM); writing "5" to
/proc/self/clear_refs resets it, so the peak inside the block is exact and costs nothing.
Elsewhere: a thread samples the RSS (psutil) every millisecond; short spikes can be missed.
"""

from __future__ import annotations

import gc
import re
import threading
from pathlib import Path

_HWM = re.compile(r"^VmHWM:\s+(\d+)\s+kB", re.MULTILINE)


def current_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _read_hwm() -> int | None:
    try:
        match = _HWM.search(Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return _read_hwm() is not None


class PeakRSS:
    """`with PeakRSS() as mem: ...` then `mem.peak_bytes` (peak RSS inside the block) and
    `mem.delta_bytes` (peak minus the RSS at entry: what the block added at its worst) and
    `mem.method` ("vmhwm" or "sampled")."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.start_bytes = 0
        self.peak_bytes = 0
        self.delta_bytes = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.start_bytes = current_rss()
        if _reset_hwm():
            self.method = "vmhwm"
        else:
            self.method = "sampled"
            self.peak_bytes = self.start_bytes
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, current_rss())
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        if self.method == "vmhwm":
            self.peak_bytes = max(_read_hwm() or 0, current_rss())
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, current_rss())
        self.delta_bytes = max(0, self.peak_bytes - self.start_bytes)
