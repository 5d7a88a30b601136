#!/bin/bash
# WebGPU (Vulkan) on an NVIDIA device machine with no Vulkan loader installed: how the bench/results/h*-wgpu*.json
# figures were made. Needs, carried from the repo root (git-ignored folders):
#   .gl/    the loader debs: apt-get download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2 (amd64)
#   .wwhl/  wheels for the device's Python: wgpu==0.32.0 cffi pycparser rendercanvas
#   .whl/   gguf-0.19.0 wheel
# Run from the repo root; results go to $OUT (or ./out), at most 8 files (log, selftest, attn, decode, two bench
# runs, gemv, gemv_shapes). PHASE=bench skips the checks and the kernel sweeps (a second, shorter run after tuning).
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
PHASE=${PHASE:-all}
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json  # NVIDIA's ICD, not Mesa's
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .wwhl/*.whl .whl/gguf*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
mkdir -p /tmp/models
M="smollm2-135m-q4_1 tinyllama-1.1b-q8_0"
python3 bench/make_models.py /tmp/models --only $M > /tmp/make.txt 2>&1 &
LOG="$OUT/log.txt"
{
  python3 -m kiln devices
  if [ "$PHASE" = all ]; then
    # Conformance on the GPU while the models are written: the shared suite (selftest) and the wgpu tests, the
    # fused decode ops included.
    timeout 45 python3 -m kiln selftest -b wgpu --json "$OUT/selftest_wgpu.json" | tail -4
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/conformance/test_wgpu_quick.py tests/unit/test_fusion.py \
      2>&1 | tail -5
    # Decode attention alone, v1 (split kernel + combine) against v2 (one dispatch) and two v2 shapes: us per call
    # for TinyLlama, SmolLM2 and 7B heads at 128/512/2048 keys, each output checked against float64.
    timeout 90 python3 bench/wgpu_kernels.py --formats none --attn --attn-nkv 128,512,2048 --min-seconds 0.05 \
      --attn-variants ${ATTN_VARIANTS:-v1,v2,v2:16x64,v2:64x16} --out "$OUT/attn.json"
  fi
  wait
  cat /tmp/make.txt
  # Decode steps under each setting; attention: the default (v2:32x32) against v1 and two more v2 shapes.
  timeout 100 python3 bench/wgpu_kernels.py --formats none --decode /tmp/models/smollm2-135m-q4_1.gguf \
    /tmp/models/tinyllama-1.1b-q8_0.gguf --decode-shapes ${SHAPES:-128x2,32x8,32x4} \
    --decode-attn ${ATTN:-v1,v2:16x64,v2:64x16} --out "$OUT/decode.json"
  # The GEMV shape and the attention setting that decoded fastest (mean speed-up over both models) for kiln bench.
  PICK=$(python3 - "$OUT/decode.json" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["decode"] if r["fuse"] and r["ahead"]]
base = {}
for r in rows:
    base.setdefault(r["model"], r)  # each model's first: the default setting
own = next(iter(base.values()))
def best(field):
    gains = {}
    for r in rows:
        if all(r[f] == own[f] for f in ("shape", "attn") if f != field):
            gains.setdefault(r[field], []).append(r["tok_s"] / base[r["model"]]["tok_s"])
    return max((k for k, v in gains.items() if len(v) == len(base)), key=lambda k: sum(gains[k]))
print(best("shape"), best("attn"))
PY
  )
  read -r SH AT <<< "$PICK"  # AT: KERNEL:SPLITSxCHUNK
  export KILN_WGPU_GEMV=$SH KILN_WGPU_ATTN_KERNEL=${AT%%:*} KILN_WGPU_ATTN=${AT#*:}
  echo "kiln bench with KILN_WGPU_GEMV=$SH KILN_WGPU_ATTN_KERNEL=$KILN_WGPU_ATTN_KERNEL KILN_WGPU_ATTN=$KILN_WGPU_ATTN"
  for n in $M; do
    timeout 45 python3 -m kiln bench -m "/tmp/models/$n.gguf" -b wgpu -p 512 -n 128 -r 2 --json "$OUT/wgpu_$n.json"
  done
  if [ "$PHASE" = all ]; then
    timeout 30 python3 bench/wgpu_kernels.py --overhead --min-seconds 0.05 --formats Q8_0,Q4_1,Q4_K,Q6_K,F16 \
      --out "$OUT/gemv.json"
    timeout 30 python3 bench/wgpu_kernels.py --min-seconds 0.05 --formats Q8_0,Q4_1 --shapes 32x8,64x4,128x2 \
      --sizes 2560x2048,2048x2048,11264x2048,2048x5632,960x576,3072x576,576x1536 --out "$OUT/gemv_shapes.json"
  fi
} > "$LOG" 2>&1
cat "$LOG"
