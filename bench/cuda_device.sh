#!/usr/bin/env bash
# The CUDA backend on one GPU machine, in one go (how bench/results/h200-cuda*.json were made):
#   1. llama.cpp's llama-bench builds in the background (bench/peers/build_llama_cpp.sh, from .peer/);
#   2. the GEMV kernel sweep (bench/gemv.py), the CUDA tests with the backend's own GEMV choice and with the block
#      kernel forced everywhere, the conformance selftest, compute-sanitizer memcheck on a fused decode, and the
#      per-kernel decode profile (bench/profile_decode.py) -- all timed on the GPU, so the build does not disturb them;
#   3. once the build is done (nothing else on the CPUs): kiln bench, then llama-bench, on the same files, and one
#      table (bench/compare.py).
# Run from the repo root with .whl/ (gguf wheel) and .peer/ carried. Output in $OUT (at most 8 files come back).
# QUICK=1 skips step 2's sweep, tests and memcheck (the build then has the CPUs to itself; the profile stays).
set -uo pipefail
OUT=${OUT:-/tmp/cuda_out}
LIMIT=${LIMIT:-570}
M=/tmp/models
MODELS=${MODELS:-tinyllama-1.1b-q8_0 smollm2-135m-q4_1 llama-7b-q8_0}
mkdir -p "$OUT" $M
LOG=$OUT/log.txt
left() { [ $((LIMIT - SECONDS)) -gt "$1" ]; }
if [ -f .peer/llama.cpp.tar.xz ]; then
  nice -n 15 bash bench/peers/build_llama_cpp.sh /tmp/llama.cpp "$(($(nproc) - 1))" >/tmp/llama_build.log 2>&1 &
  build=$!
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
{ nvidia-smi -L; git log -1 --format='kiln %h %s' 2>/dev/null; date -u; } | tee "$LOG"
timeout 200 python3 bench/make_models.py $M --only $MODELS >>"$LOG" 2>&1 &
writer=$!
step() { echo "== $1 (t=${SECONDS}s)" | tee -a "$LOG"; }
if [ -z "${QUICK:-}" ]; then
python3 - <<'PY' >>"$LOG" 2>&1  # the memcheck model, below
from gguf import GGMLQuantizationType as Q
from kiln import synth
synth.write_model("/tmp/models/wide-q8_0.gguf", synth.Shape(2, 1024, 8, 2, 11008, vocab_size=512), Q.Q8_0, seed=3)
PY
step "gemv sweep"
timeout 150 python3 bench/gemv.py --pdl --formats Q8_0 --shapes 7b tinyllama --configs warp auto block:4 block:8 \
  --json "$OUT/gemv_q8.json" 2>&1 | tee -a "$LOG"
timeout 150 python3 bench/gemv.py --pdl --formats Q4_0 Q4_1 Q4_K Q6_K F16 --shapes 7b tinyllama --configs warp auto \
  --json "$OUT/gemv_other.json" 2>&1 | tee -a "$LOG"

T="tests/conformance/test_cuda_quick.py tests/models/test_cuda_model.py"
step "tests, auto"
timeout 150 python3 -m pytest -q -p no:cacheprovider $T 2>&1 | tail -4 | tee -a "$LOG"
step "tests, block kernel forced"
KILN_GEMV=block timeout 150 python3 -m pytest -q -p no:cacheprovider $T 2>&1 | tail -4 | tee -a "$LOG"
step "selftest --full"
timeout 90 python3 -m kiln selftest -b cuda --full 2>&1 | tail -2 | tee -a "$LOG"
step "memcheck: fused decode graphs with block GEMVs (wide model)"
timeout 150 compute-sanitizer --tool memcheck python3 -m kiln bench -m $M/wide-q8_0.gguf -b cuda -p 24 -n 8 -r 1 \
  2>&1 | grep -E "ERROR SUMMARY|tg8|pp24|rror" | tee -a "$LOG"
fi
wait $writer
for m in tinyllama-1.1b-q8_0 llama-7b-q8_0; do
  step "profile $m"
  left 200 && timeout 90 python3 bench/profile_decode.py $M/$m.gguf --ctx 512 2>&1 | tail -25 | tee -a "$LOG"
done

step "waiting for the llama.cpp build"
while [ -n "${build:-}" ] && kill -0 "$build" 2>/dev/null && left 150; do sleep 5; done
tail -2 /tmp/llama_build.log | tee -a "$LOG"
for m in $MODELS; do
  step "kiln bench $m"
  left 60 && timeout 120 python3 -m kiln bench -m $M/$m.gguf -b cuda -p 512 -n 128 -r 3 --json "$OUT/kiln_$m.json" \
    2>&1 | grep -E "^\|" | tee -a "$LOG"
done
BIN=/tmp/llama.cpp/build/bin/llama-bench
if [ -x $BIN ]; then
  step "llama-bench"
  left 60 && timeout $((LIMIT - SECONDS - 15)) python3 bench/peers/llama_bench.py $BIN $(for m in $MODELS; do echo $M/$m.gguf; done) \
    -p 512 -n 128 -r 3 --json "$OUT/llama.json" 2>&1 | tail -8 | tee -a "$LOG"
fi
python3 bench/compare.py "$OUT"/kiln_*.json --peers "$OUT"/llama.json --out "$OUT/compare.json" 2>&1 | tee -a "$LOG"
step "done"
