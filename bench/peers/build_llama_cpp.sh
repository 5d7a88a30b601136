#!/usr/bin/env bash
# Run ON THE GPU MACHINE: build llama.cpp's llama-bench, llama-batched-bench and llama-server with CUDA for sm_90 from .peer/llama.cpp.tar.xz
# (prepare_llama_cpp.sh). Prints the binary's path. Usage: bash bench/peers/build_llama_cpp.sh [build-dir] [jobs]
set -euo pipefail
root=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
dir=${1:-/tmp/llama.cpp}
jobs=${2:-$(nproc)}
mkdir -p "$dir"
tar xJf "$root/.peer/llama.cpp.tar.xz" -C "$dir" --strip-components=1
cmake -S "$dir" -B "$dir/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
      -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
      -DLLAMA_BUILD_APP=OFF -DGGML_NATIVE=ON >"$dir/cmake.log" 2>&1 || { tail -30 "$dir/cmake.log"; exit 1; }
cmake --build "$dir/build" --target llama-bench llama-batched-bench llama-server -j "$jobs" >"$dir/build.log" 2>&1 || { tail -40 "$dir/build.log"; exit 1; }
echo "$dir/build/bin/llama-bench"
