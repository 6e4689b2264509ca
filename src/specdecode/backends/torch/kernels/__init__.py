"""Loading the C++ CPU kernels, compiled on first use.

`rowwise_linear.cpp` gives each output row of a small matrix product the same bits whatever the
number of rows, and is faster than the library products for the 1-16 rows of decoding and
verification (with bfloat16 dot products where the CPU has them); where the CPU has integer dot
products it also multiplies a quantized draft model's int8 weights by rows rounded to int8.
Where the CPU has AMX tile instructions and `SPECDECODE_TILES=1` asks for it, bfloat16 rows are
multiplied by tiles instead (`rowwise_linear_tiles`, on weights repacked once by
`pack_for_tiles`), with the same promise: verification forwards cost much less, one-token
forwards somewhat more (see rowwise_linear.cpp).
`rowwise_attention.cpp` gives each query row the same bits whatever the other rows and wherever
its visible keys sit (a tree's nodes). They are compiled once per machine with the system's C++
compiler into `~/.cache/specdecode/kernels/` (about 20 seconds), keyed by the sources, the
compiler flags and torch's version.

Where it cannot be had (no AVX-512, no compiler, `SPECDECODE_KERNELS=0`, a CUDA model) callers
fall back to library products, made batch-invariant by probing (`invariance.py`); a warning says
why, once.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from specdecode.models.install import cache_root

SOURCES = [Path(__file__).with_name(n) for n in ("rowwise_linear.cpp", "rowwise_attention.cpp")]
BASE_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-fopenmp"]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl")
# The CPU flag for bfloat16 dot products (rowwise_linear's bfloat16 rows, see there).
BF16_CPU_FLAG = "avx512_bf16"
# The CPU flag for integer (byte) dot products (rowwise_linear_int8).
VNNI_CPU_FLAG = "avx512_vnni"
# The CPU flags for tile matrix instructions on bfloat16 (rowwise_linear_tiles).
TILE_CPU_FLAGS = ("amx_tile", "amx_bf16")
ENV_SWITCH = "SPECDECODE_KERNELS"
# `SPECDECODE_TILES=1` puts bfloat16 rows on the tile kernel where the CPU has AMX.
TILES_ENV_SWITCH = "SPECDECODE_TILES"
# Tile layout: outputs per group of 4 tiles, inputs per step (see rowwise_linear.cpp).
TILE_GROUP_OUTPUTS = 64
TILE_STEP_INPUTS = 32
# Products of more rows (prompt prefill) are faster in the libraries' blocked GEMMs, except the
# integer ones, which take a prefill in chunks of this many rows.
MAX_ROWS = 128

_state: dict[str, object] = {}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU (empty where /proc/cpuinfo is unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def compiler_flags() -> list[str]:
    """The flags the kernels compile with on this CPU."""
    flags = cpu_flags()
    return (
        BASE_FLAGS
        + (["-mavx512bf16"] if BF16_CPU_FLAG in flags else [])
        + (["-mavx512vnni"] if VNNI_CPU_FLAG in flags else [])
        + (["-mamx-tile", "-mamx-bf16"] if set(TILE_CPU_FLAGS) <= flags else [])
    )


def _why_unavailable() -> str | None:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"{ENV_SWITCH}=0"
    missing = [flag for flag in REQUIRED_CPU_FLAGS if flag not in cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    return None


def _cache_dir() -> Path:
    sources = b"".join(s.read_bytes() for s in SOURCES)
    digest = hashlib.sha256(sources + " ".join(compiler_flags()).encode())
    digest.update(torch.__version__.encode())
    return cache_root() / "kernels" / digest.hexdigest()[:16]


def rowwise_linear() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The compiled `rowwise_linear(x [R, K] float32, weight [N, K]) -> [R, N] float32`, or None.

    Built and loaded on the first call; later calls return the same answer at no cost.
    """
    return torch.ops.specdecode_kernels.rowwise_linear if _loaded() else None


def takes_bfloat16_rows() -> bool:
    """Whether `rowwise_linear` takes bfloat16 rows (with bfloat16 weights) on this CPU, through
    its dot-product instruction, rather than float32 rows only."""
    return BF16_CPU_FLAG in cpu_flags() and rowwise_linear() is not None


def rowwise_linear_int8() -> Callable[..., torch.Tensor] | None:
    """The compiled `rowwise_linear_int8(x [R, K] float32, weight [N, K] int8, weight_sums [N]
    int32, weight_scales [N] float32) -> [R, N] float32`, or None where the CPU lacks integer dot
    products. Each row of x is rounded to int8 on its own scale first: for draft models only."""
    if VNNI_CPU_FLAG not in cpu_flags() or not _loaded():
        return None
    return torch.ops.specdecode_kernels.rowwise_linear_int8


def rowwise_linear_tiles() -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None:
    """The compiled `rowwise_linear_tiles(x [R, K] bfloat16, packed, n) -> [R, n] float32` for
    weights packed by `pack_for_tiles`, or None where the CPU lacks AMX or the OS does not lend a
    process its registers. Whether products take it is `tiles_chosen()`."""
    if "tiles" not in _state:
        _state["tiles"] = (
            set(TILE_CPU_FLAGS) <= cpu_flags()
            and _loaded()
            and bool(torch.ops.specdecode_kernels.tiles_enabled())
        )
    return torch.ops.specdecode_kernels.rowwise_linear_tiles if _state["tiles"] else None


def tiles_chosen() -> bool:
    """Whether every product of bfloat16 rows with bfloat16 weights takes the tile kernel in this
    process: asked for with `SPECDECODE_TILES=1`, and available. Fixed for the process, since
    the two kernels round differently and all forwards of a model must round alike."""
    if "tiles_chosen" not in _state:
        asked = os.environ.get(TILES_ENV_SWITCH, "0") == "1"
        _state["tiles_chosen"] = asked and rowwise_linear_tiles() is not None
        if asked and not _state["tiles_chosen"]:
            warnings.warn(
                f"specdecode: {TILES_ENV_SWITCH}=1 is ignored: this CPU or OS offers no AMX "
                "tiles (or the kernels are off)",
                RuntimeWarning,
                stacklevel=2,
            )
    return bool(_state["tiles_chosen"])


def pack_for_tiles(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [N, K] bfloat16 in the layout `rowwise_linear_tiles` reads:
    [ceil(N / 64), 4, ceil(K / 32), 16, 16, 2], zeros past N and K. Output n = 64 g + 16 j + c
    and input i = 32 s + 2 p + e sit at [g, j, s, p, c, e]: each [p, c, e] block is one tile of
    16 input pairs by 16 outputs, and the tiles of 16 outputs follow each other step by step."""
    outputs, inputs = weight.shape
    padded = torch.nn.functional.pad(
        weight, (0, -inputs % TILE_STEP_INPUTS, 0, -outputs % TILE_GROUP_OUTPUTS)
    )
    groups = padded.shape[0] // TILE_GROUP_OUTPUTS
    steps = padded.shape[1] // TILE_STEP_INPUTS
    blocks = padded.view(groups, 4, 16, steps, 16, 2)  # [g, j, c, s, p, e]
    return blocks.permute(0, 1, 3, 4, 2, 5).contiguous().view(groups, 4, steps, 16, 32)


def rowwise_attention() -> Callable[..., torch.Tensor] | None:
    """The compiled `rowwise_attention(q [Hkv, Q, D] float32, keys [Hkv, L, D], values, visible
    [R, L] bool, scale) -> [Hkv, Q, D] float32`, or None (see rowwise_attention.cpp)."""
    return torch.ops.specdecode_kernels.rowwise_attention if _loaded() else None


def _loaded() -> bool:
    """Whether the kernels are built and loaded (tried once; a warning says why not)."""
    if "loaded" in _state:
        return bool(_state["loaded"])
    _state["loaded"] = False
    reason = _why_unavailable()
    if reason is None:
        try:
            _build_and_load()
            _state["loaded"] = True
        except Exception as error:  # a missing compiler shows as many exception types
            reason = f"it did not compile ({str(error).strip().splitlines()[-1][:160]})"
    if reason is not None and reason != f"{ENV_SWITCH}=0":
        warnings.warn(
            f"specdecode: the CPU kernels are not used ({reason}); falling back to library "
            "products, which are slower for verification on this CPU",
            RuntimeWarning,
            stacklevel=3,
        )
    return bool(_state["loaded"])


def _build_and_load() -> None:
    from torch.utils.cpp_extension import load

    build_dir = _cache_dir()
    library = build_dir / "specdecode_kernels.so"
    if library.is_file():
        try:
            torch.ops.load_library(str(library))
            return
        except OSError:  # a build cut short: start it again
            shutil.rmtree(build_dir, ignore_errors=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    print("specdecode: compiling the CPU kernels (once, about 20 s)...", file=sys.stderr)
    # cpp_extension locks the build directory, so concurrent first uses build it once.
    load(
        name="specdecode_kernels",
        sources=[str(s) for s in SOURCES],
        extra_cflags=compiler_flags(),
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
