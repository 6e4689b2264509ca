#!/usr/bin/env bash
# Build only the suffix-decoding cache of Arctic Inference (Snowflake, Apache-2.0) on a CPU, for
# benchmarks/replay_suffix.py to replay recorded outputs through it beside our `suffix` drafter.
#
# The package on the index is a source archive whose build needs torch (2.7 to 2.10, by version)
# and CUDA tooling; its suffix tree is a small C++20 extension (nanobind) that needs neither. This
# fetches the archive, compiles that extension alone with g++, and lays out the pure-Python
# wrapper beside it. Nothing is installed into the project's environment.
#
#   bash benchmarks/build_arctic_suffix.sh              # into ~/.cache/specdecode/arctic
#   PYTHONPATH=~/.cache/specdecode/arctic/pkg python benchmarks/replay_suffix.py RESULTS
#
# Needs g++ with C++20, the Python that will import it (PYTHON, default: python3), and the index.
set -euo pipefail

ROOT=${ROOT:-$HOME/.cache/specdecode/arctic}
VERSION=${VERSION:-0.3.0}  # the suffix-decoding sources are the same from 0.1.0 to 0.3.0
PYTHON=${PYTHON:-python3}

rm -rf "$ROOT" && mkdir -p "$ROOT" && cd "$ROOT"
"$PYTHON" -m venv tools
tools/bin/pip install -q "nanobind==2.9.2" wheel

# pip reads the archive's metadata by running its setup.py, which imports torch first; an empty
# stand-in module, visible to this one command, lets it save the archive untouched.
mkdir -p stand-in/torch && : > stand-in/torch/__init__.py
PYTHONPATH="$ROOT/stand-in" tools/bin/pip download -q --no-deps --no-binary :all: \
    --no-build-isolation "arctic-inference==$VERSION" -d archive
tar xzf "archive/arctic_inference-$VERSION.tar.gz" -C archive
SOURCE="$ROOT/archive/arctic_inference-$VERSION"

PACKAGE="$ROOT/pkg/arctic_inference/suffix_decoding"
mkdir -p "$PACKAGE"
cp "$SOURCE/arctic_inference/__init__.py" "$ROOT/pkg/arctic_inference/"
cp "$SOURCE/arctic_inference/suffix_decoding/__init__.py" \
    "$SOURCE/arctic_inference/suffix_decoding/cache.py" "$PACKAGE/"
cp "$SOURCE/LICENSE" "$ROOT/pkg/"

NANOBIND=$(tools/bin/python -c 'import nanobind, os; print(os.path.dirname(nanobind.__file__))')
SUFFIX=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
INCLUDE=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
CPP="$SOURCE/csrc/suffix_decoding"
g++ -O3 -DNDEBUG -std=c++20 -shared -fPIC -fvisibility=hidden -fno-strict-aliasing \
    -I"$INCLUDE" -I"$NANOBIND/include" -I"$NANOBIND/ext/robin_map/include" -I"$CPP" \
    "$NANOBIND/src/nb_combined.cpp" "$CPP/bindings.cc" "$CPP/suffix_tree.cc" \
    -o "$PACKAGE/_C$SUFFIX"

cd / && PYTHONPATH="$ROOT/pkg" "$PYTHON" -c '
from arctic_inference.suffix_decoding import SuffixDecodingCache
cache = SuffixDecodingCache(max_tree_depth=24)
cache.start_request(1, [1, 2, 5, 6, 7, 8, 3])
cache.add_active_response(1, [5, 6])
draft = cache.speculate(1, [1, 2, 5, 6, 7, 8, 3, 5, 6], max_spec_tokens=4)
assert draft.token_ids[:2] == [7, 8], draft
'
echo "built: PYTHONPATH=$ROOT/pkg"
