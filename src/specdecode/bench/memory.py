"""Peak resident memory of this process during one run, sampled by a background thread.

`ru_maxrss` only ever grows over a process's life, so it cannot tell one run from the next; the
sampler reads the current resident size (Linux: /proc/self/statm) every few milliseconds instead.
Where /proc is missing it falls back to `ru_maxrss`, the peak so far.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from pathlib import Path

_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_mb() -> float:
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE / 2**20
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class PeakMemory:
    """`with PeakMemory() as peak: ...`, then `peak.mb` is the largest resident size seen."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.mb = max(self.mb, resident_mb())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        self.mb = resident_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.mb = max(self.mb, resident_mb())
