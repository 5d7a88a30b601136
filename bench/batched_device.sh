#!/usr/bin/env bash
# Issue #18 on one H200. PART=1: the batched engine's GPU tests (CUDA, WebGPU through Vulkan), both selftests,
# batch-1 `kiln bench` of this tree against the tree before the work (.base/src, carried) alternating, then
# `kiln bench --batch`. PART=2: llama.cpp (llama-batched-bench, llama-server) builds in the background while
# `kiln serve` takes the concurrent-client curve (bench/load_server.py), then the same for llama.cpp.
# Carry .whl, .gl, .base (part 1), .peer (part 2). Output: $OUT/log.txt and JSONs.
set -uo pipefail
OUT=${OUT:-/tmp/b_out}
LIMIT=${LIMIT:-560}
PART=${PART:-1}
M=/tmp/models
mkdir -p "$OUT" $M
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
MODELS=${MODELS:-tinyllama-1.1b-q8_0 llama-7b-q8_0}
if [ "$PART" = 2 ]; then
  nice -n 15 bash bench/peers/build_llama_cpp.sh /tmp/llama.cpp 13 >/tmp/llama_build.log 2>&1 &
  build=$!
fi
timeout 240 python3 bench/make_models.py $M --only smollm2-135m-q4_1 $MODELS >/tmp/make.txt 2>&1 &
writer=$!
if [ "$PART" = 1 ]; then
  step "cuda tests"
  T="tests/conformance/test_cuda_quick.py tests/models/test_cuda_model.py tests/models/test_batched_backends.py"
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider -k "not wgpu" $T 2>&1 | tail -25 | tee -a "$LOG"
  step "selftest cuda --full"
  timeout 90 python3 -m kiln selftest -b cuda --full 2>&1 | grep -v " ok " | tail -12 | tee -a "$LOG"
  step "wgpu tests"
  T="tests/conformance/test_wgpu_quick.py tests/models/test_batched_backends.py"
  timeout 120 python3 -m pytest -q -x -p no:cacheprovider -k "not cuda and not numpy" $T 2>&1 | tail -15 | tee -a "$LOG"
  step "selftest wgpu"
  timeout 60 python3 -m kiln selftest -b wgpu 2>&1 | grep -v " ok " | tail -8 | tee -a "$LOG"
  wait $writer; tail -2 /tmp/make.txt >>"$LOG"
  for m in smollm2-135m-q4_1 $MODELS; do
    for tree in base new base new; do
      src=$PWD/src; [ $tree = base ] && src=$PWD/.base/src
      step "batch-1 $m $tree"
      left 120 && PYTHONPATH=/tmp/site:$src timeout 100 python3 -m kiln bench -m $M/$m.gguf -b cuda -p 512 -n 128 -r 3 \
        2>&1 | grep -E "pp512|tg128" | tee -a "$LOG"
    done
  done
  for m in $MODELS; do
    step "kiln bench --batch $m"
    left 90 && timeout 150 python3 -m kiln bench -m $M/$m.gguf -b cuda --batch 1,8,32,64 -p 128 -n 128 \
      --json "$OUT/kiln_batch_$m.json" 2>&1 | tail -7 | tee -a "$LOG"
  done
  step "wgpu bench --batch tinyllama"
  left 60 && timeout 100 python3 -m kiln bench -m $M/tinyllama-1.1b-q8_0.gguf -b wgpu --batch 1,64 -p 128 -n 64 \
    --json "$OUT/wgpu_batch.json" 2>&1 | tail -5 | tee -a "$LOG"
else
  wait $writer; tail -2 /tmp/make.txt >>"$LOG"
  for m in $MODELS; do
    for c in ${CLIENTS:-1 16 64 256}; do
      step "kiln serve $m, $c clients"
      left 60 && timeout 120 python3 bench/load_server.py --model $M/$m.gguf --backend cuda --endpoint completions \
        --clients $c --requests 1 --max-tokens 128 --ctx 1024 --time-limit 90 --out "$OUT/kiln_serve_${m}_$c.json" \
        2>&1 | grep -E "tokens_per_s|ttft|completed|PASS|FAIL|rror" | tee -a "$LOG"
    done
  done
  step "waiting for the llama.cpp build"
  while kill -0 "$build" 2>/dev/null && left 100; do sleep 5; done
  tail -2 /tmp/llama_build.log | tee -a "$LOG"
  B=/tmp/llama.cpp/build/bin
  for m in $MODELS; do
    step "llama-batched-bench $m"
    left 60 && timeout 120 $B/llama-batched-bench -m $M/$m.gguf -ngl 99 -fa on -c 20000 -npp 128 -ntg 128 \
      -npl 1,8,32,64 2>&1 | grep -E "^\|" | tee -a "$LOG"
  done
  for m in $MODELS; do
    $B/llama-server -m $M/$m.gguf -ngl 99 -fa on -np 64 -c $((64 * 1024)) --port 8091 >/tmp/ls.log 2>&1 &
    srv=$!
    for i in $(seq 60); do curl -sf localhost:8091/health >/dev/null && break; sleep 1; done
    for c in ${CLIENTS:-1 16 64 256}; do
      step "llama-server -np 64 $m, $c clients"
      left 40 && timeout 120 python3 bench/load_server.py --url http://127.0.0.1:8091 --endpoint completions \
        --clients $c --requests 1 --max-tokens 128 --time-limit 90 --out "$OUT/llama_serve_${m}_$c.json" \
        2>&1 | grep -E "tokens_per_s|ttft|completed|PASS|FAIL|rror" | tee -a "$LOG"
    done
    kill $srv; wait $srv 2>/dev/null
  done
fi
step "done"
