"""Shared by every test module.

A cache of the suite's own. Everything the tests write (compiled kernels, converted weights, cost
curves measured under test load, models the user has not installed) goes to a temporary
`SPECDECODE_CACHE` that is removed when the run ends, so a benchmark never reuses a curve that a
test measured. Models already installed in the user's cache are read from there
(`SPECDECODE_MODEL_DIRS`, read only), and so is a built llama-server. This runs before any
specdecode module is imported.

The test process runs all of llama.cpp's kernels, which are reserved before any test starts
llama.cpp: the tiled kernel off (for the matched and wide kernels), and specdecode's Q4_K
matrix-vector kernel in place of llama.cpp's (for the matched kernels, where the CPU can run it).
(The narrow kernels with the tiled kernel on and llama.cpp's own matrix-vector kernel, as
`--backend llamacpp` runs a file the matched kernels do not cover, are tested in a process of
their own.)
"""

import atexit
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

_user_cache = Path(os.environ.get("SPECDECODE_CACHE") or Path.home() / ".cache" / "specdecode")
_test_cache = tempfile.mkdtemp(prefix="specdecode-tests-")
atexit.register(shutil.rmtree, _test_cache, ignore_errors=True)
os.environ["SPECDECODE_CACHE"] = _test_cache
os.environ["SPECDECODE_MODEL_DIRS"] = os.pathsep.join(
    part
    for part in [str(_user_cache / "models"), os.environ.get("SPECDECODE_MODEL_DIRS", "")]
    if part
)
if "SPECDECODE_LLAMA_SERVER" not in os.environ and (_user_cache / "bin" / "llama-server").is_file():
    os.environ["SPECDECODE_LLAMA_SERVER"] = str(_user_cache / "bin" / "llama-server")

from specdecode.backends.llamacpp import reserve_kernels  # noqa: E402
from specdecode.errors import SpecDecodeError  # noqa: E402

if importlib.util.find_spec("llama_cpp") is not None:
    try:
        reserve_kernels(["narrow", "wide", "stock", "matched"])
    except SpecDecodeError:  # this machine cannot run the matched kernels: their tests skip
        reserve_kernels(["narrow", "wide", "stock"])
