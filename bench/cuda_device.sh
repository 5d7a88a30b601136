#!/usr/bin/env bash
# The CUDA GEMV kernels on a GPU machine, in one go: the kernel-shape sweep (bench/gemv.py), the CUDA tests with the
# backend's own kernel choice and with the block kernel forced everywhere, and kiln bench (auto against the warp
# kernel) on random TinyLlama, SmolLM2 and 7B models. Run from the repo root; wheels missing on the machine (gguf)
# are read from .whl/. Logs and JSON go to $OUT (default /tmp/cuda_out).
set -uo pipefail
OUT=${OUT:-/tmp/cuda_out}
mkdir -p "$OUT" /tmp/models
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/env.txt"
MODELS=${MODELS:-tinyllama-1.1b-q8_0 smollm2-135m-q4_1 llama-7b-q8_0}
timeout 200 python3 bench/make_models.py /tmp/models --only $MODELS >"$OUT/make.log" 2>&1 &
writer=$!

echo "== gemv sweep (t=${SECONDS}s)"
timeout 240 python3 bench/gemv.py --pdl --formats Q8_0 --shapes 7b tinyllama \
  --configs ${CONFIGS:-warp block:8:1 block:4:1 block:16:1 block:8:2 block:0:1:1024} --json "$OUT/gemv_q8.json" 2>&1 | tee "$OUT/gemv.txt"
timeout 200 python3 bench/gemv.py --pdl --formats Q4_0 Q4_1 Q4_K Q6_K --shapes 7b tinyllama --configs warp auto \
  --json "$OUT/gemv_other.json" 2>&1 | tee -a "$OUT/gemv.txt"

echo "== tests (t=${SECONDS}s)"
T="tests/conformance/test_cuda_quick.py tests/models/test_cuda_model.py"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider $T 2>&1 | tail -5 | tee "$OUT/tests_auto.txt"
KILN_GEMV=block timeout 150 python3 -m pytest -q -x -p no:cacheprovider $T 2>&1 | tail -5 | tee "$OUT/tests_block.txt"
KILN_GEMV=block timeout 90 python3 -m kiln selftest -b cuda --full 2>&1 | tail -4 | tee "$OUT/selftest_block.txt"

wait $writer
echo "== bench (t=${SECONDS}s)"
for m in $MODELS; do
  for kind in auto warp; do
    KILN_GEMV=$kind timeout 120 python3 -m kiln bench -m "/tmp/models/$m.gguf" -b cuda -p 512 -n 128 -r 2 \
      --json "$OUT/bench_${m}_$kind.json" 2>&1 | tail -3
  done
done
echo "== done (t=${SECONDS}s)"
