"""What one target forward costs on this machine, as a function of the draft length it verifies.

The cost-aware controller needs `seconds(k)` for a verification forward over the root and `k`
drafts. It could learn every point online, but it would then spend the start of every generation
trying lengths that do not pay. Instead the curve is measured once per backend, model and thread
count: a short synthetic context is prefilled and a forward of `k + 1` tokens is timed for a few
draft lengths (the fastest of a few runs: a shared machine only ever adds time). The curve is
cached on disk under a key the backend gives (`Backend.cost_key`) and one for the CPU, so later
processes on this machine start from it at once, and a cache shared by different machines (a home
directory on a cluster) keeps a curve for each; the controller keeps refining it from the steps
it times.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch

from specdecode.backends.base import Backend

#: Draft lengths measured; the controller interpolates linearly between them.
MEASURED_LENGTHS = (0, 1, 2, 3, 4, 6, 8, 12, 16)
#: Forward sizes measured for the server's batches (rows of every sequence, less one): what the
#: goodput planner (`goodput.py`) interpolates.
BATCH_LENGTHS = (0, 1, 3, 7, 11, 15, 23, 31, 47, 63, 95, 127)
_CONTEXT_TOKENS = 128
_RUNS = 3


def cache_dir() -> Path:
    from specdecode.models.install import cache_root

    return cache_root() / "costs"


@functools.cache
def cpu_identity() -> str:
    """A short digest of this CPU: its model name, instruction-set flags and the cores this process
    may use (the same file on another machine could be twice as fast or slow)."""
    described = [platform.machine()]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")) and line not in described:
                described.append(line)
    except OSError:
        described.append(platform.processor())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    described.append(f"cores {cores}")
    return hashlib.sha256("\n".join(described).encode()).hexdigest()[:12]


def cache_path(key: str) -> Path:
    """Where the curve of the backend configuration `key` is cached for this CPU."""
    return cache_dir() / f"{key}-cpu{cpu_identity()}.json"


def measure(backend: Backend, lengths: tuple[int, ...] = MEASURED_LENGTHS) -> dict[int, float]:
    """Seconds of one forward over `k + 1` new tokens after a short context, for each `k`."""
    # Token ids are arbitrary: the cost of a forward does not depend on which tokens it reads.
    context = [(17 * i) % backend.vocab_size for i in range(_CONTEXT_TOKENS)]
    seconds: dict[int, float] = {}
    with torch.inference_mode():
        backend.reset()
        backend.extend(context)
        for length in lengths:
            ids = torch.tensor(context[: length + 1], dtype=torch.long)
            best = float("inf")
            for _ in range(_RUNS):
                start = time.perf_counter()
                backend.forward(ids)
                best = min(best, time.perf_counter() - start)
                backend.truncate(_CONTEXT_TOKENS)
            seconds[length] = best
        backend.reset()
    return seconds


def fitting(lengths: tuple[int, ...], max_context: int) -> tuple[int, ...]:
    """The lengths whose measurement fits in a context of `max_context` tokens."""
    return tuple(k for k in lengths if _CONTEXT_TOKENS + k + 1 <= max_context)


def load_or_measure(backend: Backend) -> dict[int, float] | None:
    """The backend's cost curve from the disk cache, else measured now (and cached); None when
    the backend gives no cache key (its costs are then learned online only)."""
    key = backend.cost_key
    if key is None:
        return None
    path = cache_path(key)
    try:
        raw = json.loads(path.read_text())
        return {int(length): float(value) for length, value in raw["seconds"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # not measured yet, or a damaged file: measure again
    seconds = measure(backend)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"key": key, "seconds": seconds}, indent=1))
        tmp.replace(path)  # atomic: a killed process never leaves half a file
    except OSError:
        pass  # an unwritable cache costs a re-measurement next time, nothing else
    return seconds
