#!/usr/bin/env bash
# Run HERE (a machine with PyPI access): fetch the llama-cpp-python sdist and keep only what building
# llama-bench with CUDA needs, as .peer/llama.cpp.tar.xz (a few MB) to carry to the GPU machine. Never committed:
# .peer/ is in .git/info/exclude. Usage: bash bench/peers/prepare_llama_cpp.sh [sdist.tar.gz]
set -euo pipefail
root=$(git rev-parse --show-toplevel)
out=$root/.peer
mkdir -p "$out"
work=$(mktemp -d)
sdist=${1:-}
if [ -z "$sdist" ]; then
    python3 -m pip download --no-deps --no-binary :all: llama-cpp-python -d "$work/dl" >/dev/null
    sdist=$(ls "$work"/dl/llama_cpp_python-*.tar.gz)
fi
tar xzf "$sdist" -C "$work"
src=$(ls -d "$work"/llama_cpp_python-*/vendor/llama.cpp)
version=$(basename "$(dirname "$(dirname "$src")")")
cd "$src"
rm -rf docs models examples pocs tests benches app tools/ui media gguf-py conversion scripts \
       .github ci skills grammars requirements *.py
for d in ggml/src/ggml-*/; do
    case "$d" in ggml/src/ggml-cuda/|ggml/src/ggml-cpu/) ;; *) rm -rf "$d" ;; esac
done
# llama-bench (batch-1 speed), batched-bench and server (the batched engine's peers); mtmd is a server dependency
find tools -mindepth 1 -maxdepth 1 -type d ! -name llama-bench ! -name batched-bench ! -name server ! -name mtmd \
    -exec rm -rf {} +
printf 'add_subdirectory(%s)\n' llama-bench batched-bench mtmd server > tools/CMakeLists.txt
echo "$version" > KILN_PEER_VERSION
cd ..
tar cJf "$out/llama.cpp.tar.xz" llama.cpp
rm -rf "$work"
# The embedded SmolLM2's tokenizer keys alone (no tensors, ~2 MB): bench/make_models.py gives the random models this
# tokenizer on GPU machines where the 98 MB model package cannot travel, so that llama.cpp loads them.
python3 - "$out/smollm2-tokenizer.gguf" <<'PY'
import sys

from gguf import GGUFReader, GGUFWriter

from kiln.api import default_model_path

reader = GGUFReader(default_model_path())
writer = GGUFWriter(sys.argv[1], "llama")
for key, field in reader.fields.items():
    if key.startswith("tokenizer."):
        value = field.contents()
        if isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, field.types[0])
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.close()
PY
ls -l "$out/llama.cpp.tar.xz" "$out/smollm2-tokenizer.gguf"
