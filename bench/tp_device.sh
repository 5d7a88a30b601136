#!/usr/bin/env bash
# Tensor parallelism on one host of 2 GPUs, in two device calls made back to back (a call runs 600 s at most; the
# machine keeps /tmp while it stays warm between them):
#   bash bench/tp_device.sh a   starts llama.cpp's build (setsid, nice 19, in the background), writes the random
#                               Llama-7B Q8_0 and Llama-70B Q4_0 GGUFs, sweeps NCCL settings (bench/tp_allreduce.py),
#                               runs tests/models/test_cuda_tp.py, then kiln bench N=1 and N=2 on both models, with
#                               the all-reduces left out (a diagnostic, wrong outputs), prefill without the replayed
#                               plan, and with the sweep's best NCCL setting
#   bash bench/tp_device.sh b   waits for the build, runs llama-bench on the same files at N=1 (CUDA_VISIBLE_DEVICES=0)
#                               and N=2 with -sm layer and -sm row, then kiln N=1/N=2 (and the fold off) on a quiet CPU
# Phase a's kiln runs share the CPU with the build (nice 19: it yields to them); every JSON records whether the build
# was running. Every step has its own time limit and is skipped when the phase's LIMIT (seconds) would be passed.
# Carry .whl (gguf wheel) and .peer (llama.cpp source). Everything lands in $OUT/tp_<phase>.tar.gz + summary_<phase>.txt.
set -uo pipefail
PHASE=${1:-a}
OUT=${OUT:-/tmp/tp_out}
W=/tmp/tp
RES=$W/$PHASE
M=/tmp/models
mkdir -p "$OUT" "$RES" "$M"
LIMIT=${LIMIT:-$([ "$PHASE" = a ] && echo 260 || echo 180)}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
N7=${N7:-llama-7b-q8_0} N70=${N70:-llama-70b-q4_0}  # bench/make_models.py names (smaller ones for a dry run)
M7=$M/$N7.gguf
M70=$M/$N70.gguf
BACKEND=${BACKEND:-cuda}
LB=/tmp/llama.cpp/build/bin/llama-bench
left() { [ $((LIMIT - SECONDS)) -gt "$1" ]; }
log() { echo "== $* (t=${SECONDS}s)" | tee -a "$RES/steps.log"; }
building() { [ -f /tmp/llama_build.started ] && [ ! -f /tmp/llama_build.done ] && echo true || echo false; }
finish() {
  python3 bench/tp_summary.py "$W" >"$RES/summary.txt" 2>&1
  cat "$RES/summary.txt"
  tar czf "$OUT/tp_$PHASE.tar.gz" -C "$W" "$PHASE"
  cp "$RES/summary.txt" "$OUT/summary_$PHASE.txt"
}
trap finish EXIT

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src

# kiln bench: name, budget s, model, N, env..., [-- extra kiln bench args]. Writes $RES/name.json (+ .meta.json).
kbench() {
  local name=$1 budget=$2 model=$3 n=$4; shift 4
  local envs=() extra=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
  [ $# -gt 0 ] && { shift; extra=("$@"); }
  if [ ! -f "$model" ]; then log "$name skipped: no $model"; return; fi
  if ! left "$budget"; then log "$name skipped: $((LIMIT - SECONDS)) s left"; return; fi
  log "$name: N=$n ${envs[*]:-} ${extra[*]:-}"
  printf '{"name": "%s", "phase": "%s", "env": "%s", "llama_cpp_build_running": %s}\n' \
    "$name" "$PHASE" "${envs[*]:-}" "$(building)" >"$RES/$name.meta.json"
  env "${envs[@]}" timeout $((budget + 15)) python3 bench/peak_rss.py --timeout "$budget" --json "$RES/$name.rss.json" -- \
    python3 -m kiln bench -m "$model" -b "$BACKEND" -p 512 -n 128 -r 3 --tensor-parallel "$n" --json "$RES/$name.json" \
    "${extra[@]}" 2>&1 | tee -a "$RES/bench.log"
}

if [ "$PHASE" = a ]; then
  if [ ! -x "$LB" ] && [ ! -f /tmp/llama_build.started ] && [ -z "${NO_BUILD:-}" ]; then
    date +%s >/tmp/llama_build.started
    setsid nohup nice -n 19 bash -c "bash bench/peers/build_llama_cpp.sh /tmp/llama.cpp $(($(nproc) - 4)); \
      echo \$? >/tmp/llama_build.done" >/tmp/llama_build.out 2>&1 </dev/null &
  fi
  {
    nvidia-smi -L; nvidia-smi topo -m; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    nproc; free -g; df -h /tmp
    python3 -c "import sys, cupy; print(sys.version.split()[0], 'cupy', cupy.__version__, 'gpus', cupy.cuda.runtime.getDeviceCount())"
    git log --oneline -5 2>/dev/null || true
  } >"$RES/env.txt" 2>&1
  if ! python3 -c "import kiln.tp as t; print('nccl', t._import_nccl().get_version())" >>"$RES/env.txt" 2>&1; then
    lib=$(python3 -c "import glob, sys; print(next((g for p in sys.path for g in glob.glob(p + '/nvidia/*/lib/libnccl.so.2')), ''))")
    export LD_LIBRARY_PATH=$(dirname "${lib:-/x/x}"):${LD_LIBRARY_PATH:-}
    echo "NCCL not found by CuPy; LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >>"$RES/env.txt"
  fi
  cat "$RES/env.txt"

  log "writing models"
  (timeout 200 python3 bench/make_models.py "$M" --only "$N7" --workers 6 >"$RES/make_7b.log" 2>&1) &
  w7=$!
  (timeout 280 python3 bench/make_models.py "$M" --only "$N70" --workers 14 >"$RES/make_70b.log" 2>&1) &
  w70=$!

  log "NCCL all-reduce sweep"
  # shellcheck disable=SC2086
  timeout 60 python3 bench/tp_allreduce.py --sweep ${SWEEP:+--only $SWEEP} -r 10 --json "$RES/allreduce_sweep.json" \
    --best-env 4096 2>&1 | tee "$RES/allreduce.log"
  BEST=$(grep '^BEST' "$RES/allreduce.log" | cut -c6-)
  wait $w7; cat "$RES/make_7b.log"
  kbench tp1_7b 45 "$M7" 1
  kbench tp2_7b 45 "$M7" 2
  kbench diag_tp2_7b_no_allreduce 40 "$M7" 2 KILN_TP_DIAG_SKIP_ALLREDUCE=1
  if left 100; then
    log "test_cuda_tp"
    timeout 80 python3 -m pytest -q -s -p no:cacheprovider tests/models/test_cuda_tp.py 2>&1 | tee "$RES/test.log"
  fi
  log "waiting for the 70B file"
  wait $w70; cat "$RES/make_70b.log"
  kbench tp1_70b 70 "$M70" 1
  kbench tp2_70b 70 "$M70" 2
  kbench tp2_7b_noplan 30 "$M7" 2 KILN_TP_PREFILL_PLAN=0 -- -n 0
  if [ -n "$BEST" ]; then
    # shellcheck disable=SC2086
    kbench tp2_7b_nccl_best 40 "$M7" 2 $BEST
  fi
  kbench diag_tp2_70b_no_allreduce 50 "$M70" 2 KILN_TP_DIAG_SKIP_ALLREDUCE=1 -- -p 0
else
  log "waiting for llama.cpp's build ($(building))"
  while [ "$(building)" = true ] && left 110; do sleep 2; done
  cat /tmp/llama_build.done /tmp/llama_build.out 2>/dev/null | tail -5 | tee "$RES/build.log"
  if [ -x "$LB" ]; then
    for spec in "7b $M7 3" "70b $M70 2"; do
      set -- $spec
      for mode in n1 layer row ${LLAMA_EXTRA_MODES:-tensor}; do
        budget=$([ "$1" = 7b ] && echo 40 || echo 60)
        if ! left "$budget"; then log "llama.cpp $1 $mode skipped"; continue; fi
        log "llama.cpp $1 $mode"
        if [ $mode = n1 ]; then gp=(--gpus 0); else gp=(--gpus 0,1 --split-mode $mode); fi
        timeout "$budget" python3 bench/peers/llama_bench.py "$LB" "$2" -p 512 -n 128 -r "$3" "${gp[@]}" \
          --timeout $((budget - 5)) --json "$RES/llama_${1}_$mode.json" 2>&1 | tee -a "$RES/llama.log"
      done
    done
  else
    log "no llama-bench: $(tail -3 /tmp/llama_build.out 2>/dev/null)"
  fi
  kbench quiet_tp1_7b 30 "$M7" 1
  kbench quiet_tp2_7b 30 "$M7" 2
  kbench quiet_tp2_7b_nofold 30 "$M7" 2 KILN_TP_FOLD=0
fi
log "done"
