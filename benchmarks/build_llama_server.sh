#!/usr/bin/env bash
# Build llama.cpp's llama-server for the benchmark's llamacpp-server peers, from the llama.cpp
# sources vendored in the source package of the installed llama-cpp-python (the same llama.cpp
# as the llamacpp backend). About 10 minutes on 2 cores. Run it with the project's Python active.
#
#   bash benchmarks/build_llama_server.sh
#
# Installs $SPECDECODE_CACHE/bin/llama-server (default ~/.cache/specdecode/bin/llama-server).
set -euo pipefail

python=${PYTHON:-$(command -v python || command -v python3)}
if ! version=$("$python" -c "import llama_cpp; print(llama_cpp.__version__)" 2>/dev/null); then
    echo "error: llama-cpp-python is not installed: pip install -e '.[llamacpp]' first" >&2
    exit 1
fi
dest="${SPECDECODE_CACHE:-$HOME/.cache/specdecode}/bin"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "fetching the llama-cpp-python $version source package" >&2
"$python" -m pip download --quiet --no-deps --no-binary :all: "llama_cpp_python==$version" -d "$work"
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
source_dir=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)

if [ "$(uname -m)" = x86_64 ]; then
    # Without llama.cpp's AMX kernels, which crash on many virtual machines (see amx_error in
    # src/specdecode/backends/llamacpp.py); CMake takes these at the first configure.
    no_amx=$("$python" -c "from specdecode.backends.llamacpp import NO_AMX_FLAGS; print(NO_AMX_FLAGS)")
    export CFLAGS="${CFLAGS:-} $no_amx" CXXFLAGS="${CXXFLAGS:-} $no_amx"
fi

echo "building llama-server (about 10 minutes on 2 cores)" >&2
cmake -S "$source_dir" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF >"$work/configure.log" 2>&1 \
    || { tail -20 "$work/configure.log" >&2; exit 1; }
cmake --build "$work/build" --target llama-server -j "$(nproc)" >"$work/build.log" 2>&1 \
    || { tail -20 "$work/build.log" >&2; exit 1; }

mkdir -p "$dest"
# copied under a temporary name and renamed: an interrupted install leaves no broken binary
install -m 755 "$work/build/bin/llama-server" "$dest/llama-server.partial"
mv "$dest/llama-server.partial" "$dest/llama-server"
echo "installed $dest/llama-server" >&2
