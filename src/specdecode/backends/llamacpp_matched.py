"""The matched kernels' C code (`llamacpp_matched.c`): two of llama.cpp's CPU kernels, summing in
the order of the kernels llama.cpp uses for the same weights in a batch.

llama.cpp multiplies a batch's rows of repacked Q4_K weights in groups of 4 with a matrix-matrix
kernel and the remaining rows (and a lone token) with a matrix-vector kernel that rounds its float
sums at other points; Q6_K weights go through a per-element dot product below 8 rows and a tiled
kernel from 8 on, again rounding elsewhere. So a token's logits depend on the batch it is in. The
kernels here compute what llama.cpp's matrix-vector kernel and dot product compute, summed in the
order of the matrix-matrix and tiled kernels: with them, every row of every batch gets the same
bits ("matched" kernels, see LlamaCppBackend), and a verification forward runs at llama.cpp's own
batch speed.

They replace llama.cpp's functions of the same names by symbol interposition: the shared library
built here is loaded into the process's global scope before llama-cpp-python loads llama.cpp,
whose CPU backend reaches the functions through its procedure linkage table and a relocated table
of function pointers, so the first definition in the global scope wins. They therefore apply to
every llama.cpp model of the process. Whether the result is exact is checked on each model that
runs the matched kernels (LlamaCppBackend). Built once per machine with the system's C compiler
(under a second) into `~/.cache/specdecode/kernels/`, keyed by the source and the compiler flags.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from specdecode.models.install import cache_root

SOURCE = Path(__file__).with_name("llamacpp_matched.c")
FLAGS = [
    "-O3",  # unrolls the kernels' short loops; at -O2 the Q6_K dot product runs 60% slower
    "-march=native",  # built on the machine it runs on; tuned for it
    "-shared",
    "-fPIC",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512vnni",
    "-mf16c",
    "-mfma",
    "-ffp-contract=off",  # every float operation as written: the order is the point
]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma")
#: The ggml weight types whose products are batch-invariant with these kernels: Q4_K in groups of
#: 8 rows (which llama.cpp repacks), Q6_K.
COVERED_TYPES = ("Q4_K", "Q6_K")
#: Q4_K weights are repacked, and so covered, when their output rows come in groups of this many.
Q4_K_ROW_GROUP = 8

_library: ctypes.CDLL | None = None


def cpu_flags() -> frozenset[str]:
    from specdecode.backends.torch.kernels import cpu_flags as flags

    return flags()


def why_unavailable() -> str | None:
    """Why the kernels cannot run on this machine, or None."""
    missing = [flag for flag in REQUIRED_CPU_FLAGS if flag not in cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if not _compiler() or shutil.which(_compiler()[0]) is None:
        return f"no C compiler ({' '.join(_compiler()) or 'CC is empty'}; set CC)"
    return None


def load() -> None:
    """Build (once per machine) and load the kernels into the process's global scope; call before
    llama_cpp is imported. Raises RuntimeError saying why it cannot."""
    global _library
    if _library is not None:
        return
    reason = why_unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    if "llama_cpp" in sys.modules:
        raise RuntimeError("llama_cpp was imported before the kernels could be put in place")
    try:
        _library = ctypes.CDLL(str(_build()), mode=ctypes.RTLD_GLOBAL)
    except (OSError, subprocess.SubprocessError) as error:  # an unwritable cache, a noexec mount
        raise RuntimeError(f"specdecode's kernels could not be built or loaded ({error})") from None


def loaded() -> bool:
    return _library is not None


def used() -> dict[str, bool]:
    """Whether llama.cpp has called each kernel in this process (False if not loaded)."""
    flags = {"gemv_q4_K": "specdecode_gemv_used", "vec_dot_q6_K": "specdecode_vec_dot_used"}
    if _library is None:
        return dict.fromkeys(flags, False)
    return {
        kernel: bool(ctypes.c_int.in_dll(_library, flag).value) for kernel, flag in flags.items()
    }


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC", "cc"))


def _machine() -> str:
    """What -march=native compiles for: the CPU model and flags, and the compiler's version."""
    lines: list[str] = []
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line for line in lines if "model name" in line), "")
    version = subprocess.run(
        [*_compiler(), "-dumpfullversion", "-dumpversion"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    return f"{model} {' '.join(sorted(cpu_flags()))} {version}"


def _build() -> Path:
    key = SOURCE.read_bytes() + " ".join([*_compiler(), *FLAGS, _machine()]).encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    library = cache_root() / "kernels" / f"llamacpp-matched-{digest}.so"
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Built under a name of its own and renamed: a build cut short never leaves a library behind.
    handle, name = tempfile.mkstemp(suffix=".partial", dir=library.parent)
    os.close(handle)
    partial = Path(name)
    try:
        result = subprocess.run(
            [*_compiler(), *FLAGS, str(SOURCE), "-o", str(partial)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines() or ["no output"]
            first_error = next((line for line in lines if "error" in line), lines[-1])
            raise RuntimeError(f"specdecode's kernels did not compile ({first_error[:160]})")
        os.replace(partial, library)
    finally:
        partial.unlink(missing_ok=True)
    return library
