"""Shared by every test module.

The test process runs all of llama.cpp's kernels, which are reserved before any test starts
llama.cpp: the tiled kernel off (for the matched and wide kernels), and specdecode's Q4_K
matrix-vector kernel in place of llama.cpp's (for the matched kernels, where the CPU can run it).
(The narrow kernels with the tiled kernel on and llama.cpp's own matrix-vector kernel, as
`--backend llamacpp` runs a file the matched kernels do not cover, are tested in a process of
their own.)
"""

import importlib.util

from specdecode.backends.llamacpp import reserve_kernels
from specdecode.errors import SpecDecodeError

if importlib.util.find_spec("llama_cpp") is not None:
    try:
        reserve_kernels(["narrow", "wide", "stock", "matched"])
    except SpecDecodeError:  # this machine cannot run the matched kernels: their tests skip
        reserve_kernels(["narrow", "wide", "stock"])
