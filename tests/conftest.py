"""Shared by every test module.

The test process runs all of llama.cpp's kernels, which are reserved before any test starts
llama.cpp: the tiled kernel off (for the matched and wide kernels), and specdecode's Q4_K
matrix-vector kernel in place of llama.cpp's (for the matched kernels, where the CPU can run it).
(The narrow kernels with the tiled kernel on and llama.cpp's own matrix-vector kernel, as
`--backend llamacpp` runs a file the matched kernels do not cover, are tested in a process of
their own.)
"""

from specdecode.backends import llamacpp_matched
from specdecode.backends.llamacpp import reserve_kernels

kernels = ["narrow", "wide", "stock"]
if llamacpp_matched.why_unavailable() is None:
    kernels.append("matched")
reserve_kernels(kernels)
