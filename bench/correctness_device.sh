#!/usr/bin/env bash
# Issue #17's GPU checks on one H200, in one call: the CUDA and WebGPU (Vulkan) tests touched by the correctness work
# (rope scaling, biases, the embed bounds), both selftests, then batch-1 `kiln bench` of the final tree against the
# tree before the work (.base/src, carried) on the same random-weight files, alternating, so any slowdown shows.
# Carry .whl (gguf, wgpu + cffi/pycparser/rendercanvas, fastapi stack), .gl (Vulkan loader debs) and .base.
# Output: $OUT/log.txt and the bench JSONs.
set -uo pipefail
OUT=${OUT:-/tmp/corr_out}
LIMIT=${LIMIT:-570}
M=/tmp/models
MODELS=${MODELS:-smollm2-135m-q4_1 tinyllama-1.1b-q8_0 llama-7b-q8_0}
mkdir -p "$OUT" $M /tmp/bench
LOG=$OUT/log.txt
left() { [ $((LIMIT - SECONDS)) -gt "$1" ]; }
step() { echo "== $1 (t=${SECONDS}s)" | tee -a "$LOG"; }
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
{ nvidia-smi -L; git log -1 --format='kiln %h %s' 2>/dev/null; date -u; } | tee "$LOG"
timeout 240 python3 bench/make_models.py $M --only $MODELS >/tmp/make.txt 2>&1 &
writer=$!

step "cuda tests"
T="tests/conformance/test_cuda_quick.py tests/models/test_cuda_model.py tests/unit/test_tensor_table.py"
T="$T tests/models/test_rope_scaling.py tests/unit/test_rope.py tests/server/test_hardening.py"
timeout 200 python3 -m pytest -q -p no:cacheprovider -k "not wgpu" $(ls $T 2>/dev/null) 2>&1 | tail -15 | tee -a "$LOG"
step "selftest cuda --full"
timeout 90 python3 -m kiln selftest -b cuda --full 2>&1 | tail -3 | tee -a "$LOG"
step "wgpu tests"
T="tests/conformance/test_wgpu_quick.py tests/unit/test_tensor_table.py tests/models/test_rope_scaling.py"
timeout 150 python3 -m pytest -q -p no:cacheprovider -k "not cuda" $(ls $T 2>/dev/null) 2>&1 | tail -8 | tee -a "$LOG"
step "selftest wgpu"
timeout 60 python3 -m kiln selftest -b wgpu 2>&1 | tail -3 | tee -a "$LOG"

wait $writer
cat /tmp/make.txt | tail -3 >>"$LOG"
for m in $MODELS; do
  for tree in base new base new; do
    left 60 || break
    src=$PWD/src
    [ $tree = base ] && src=$PWD/.base/src
    step "kiln bench $m ($tree)"
    PYTHONPATH=/tmp/site:$src timeout 120 python3 -m kiln bench -m $M/$m.gguf -b cuda -p 512 -n 128 -r 3 \
      --json "/tmp/bench/cuda_${m}_$tree.json" 2>&1 | grep -E "^\| [A-Za-z]" | tail -2 | tee -a "$LOG"
  done
done
for m in smollm2-135m-q4_1 tinyllama-1.1b-q8_0; do
  for tree in base new; do
    left 50 || break
    src=$PWD/src
    [ $tree = base ] && src=$PWD/.base/src
    step "kiln bench wgpu $m ($tree)"
    PYTHONPATH=/tmp/site:$src timeout 100 python3 -m kiln bench -m $M/$m.gguf -b wgpu -p 512 -n 128 -r 3 \
      2>&1 | grep -E "^\| [A-Za-z]" | tail -2 | tee -a "$LOG"
  done
done
tar czf "$OUT/bench_json.tgz" -C /tmp bench
step "done"
