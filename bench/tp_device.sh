#!/usr/bin/env bash
# Tensor parallelism on one host of >= 2 GPUs, in one go: the 2-GPU test (tests/models/test_cuda_tp.py), then
# kiln bench on a random Llama-7B-shape Q8_0 with --tensor-parallel 1 and 2 (CUDA graphs on, then off).
#   bash bench/tp_device.sh [OUT_DIR]      (OUT_DIR default $OUT or /tmp/tp_out; models go to /tmp/models)
# Wheels missing on the machine (gguf) are read from .whl/ when it exists. Every step has its own time limit, so a
# hang costs one step, and later steps are skipped when the total nears LIMIT seconds (default 380).
set -uo pipefail
OUT=${1:-${OUT:-/tmp/tp_out}}
LIMIT=${LIMIT:-380}
P=${P:-512} N=${N:-128} R=${R:-1}
mkdir -p "$OUT" /tmp/models
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 NCCL_DEBUG=${NCCL_DEBUG:-WARN}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src
NAME=${NAME:-llama-7b-q8_0}  # a bench/make_models.py name
MODEL=/tmp/models/$NAME.gguf
left() { [ $((LIMIT - SECONDS)) -gt "$1" ]; }

{
  nvidia-smi -L; nvidia-smi topo -m
  python3 -c "import sys, cupy; print(sys.version.split()[0], 'cupy', cupy.__version__, 'gpus', cupy.cuda.runtime.getDeviceCount())"
  if ! python3 -c "import kiln.tp as t; print('nccl', t._import_nccl().get_version())"; then
    lib=$(python3 -c "import glob, sys; print(next((g for p in sys.path for g in glob.glob(p + '/nvidia/*/lib/libnccl.so.2')), ''))")
    echo "NCCL not found by CuPy; LD_LIBRARY_PATH += $(dirname "$lib")"
    export LD_LIBRARY_PATH=$(dirname "$lib"):${LD_LIBRARY_PATH:-}
    python3 -c "import kiln.tp as t; print('nccl', t._import_nccl().get_version())"
  fi
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The 7B file is written while the test runs (CPU work).
timeout 240 python3 bench/make_models.py /tmp/models --only "$NAME" >"$OUT/bench.log" 2>&1 &
writer=$!

echo "== test_cuda_tp (t=${SECONDS}s)"
timeout 150 python3 -m pytest -q -s -p no:cacheprovider tests/models/test_cuda_tp.py 2>&1 | tee "$OUT/test.log"
wait $writer || echo "model writer failed: $?" | tee -a "$OUT/bench.log"

bench() {  # name, budget seconds, env..., then kiln bench arguments after --
  local name=$1 budget=$2; shift 2
  local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  if ! left "$budget"; then echo "== $name skipped: $((LIMIT - SECONDS)) s left" | tee -a "$OUT/bench.log"; return; fi
  echo "== $name (t=${SECONDS}s)" | tee -a "$OUT/bench.log"
  env "${envs[@]}" timeout "$budget" python3 -m kiln bench -m "$MODEL" -b cuda -p "$P" -n "$N" -r "$R" \
    --json "$OUT/$name.json" "$@" 2>&1 | tee -a "$OUT/bench.log"
}
if [ -f "$MODEL" ]; then
  bench tp1 90 KILN_CUDA_GRAPHS=1 -- --tensor-parallel 1
  bench tp2 100 KILN_CUDA_GRAPHS=1 -- --tensor-parallel 2
  bench tp2_eager 70 KILN_CUDA_GRAPHS=0 -- --tensor-parallel 2
  bench tp1_eager 60 KILN_CUDA_GRAPHS=0 -- --tensor-parallel 1
fi
echo "== done (t=${SECONDS}s)"
