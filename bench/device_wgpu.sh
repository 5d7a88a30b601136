#!/bin/bash
# WebGPU (Vulkan) on an NVIDIA device machine with no Vulkan loader installed: how the H100 figures in
# bench/results/h100-wgpu*.json were made. Needs, carried from the repo root (git-ignored folders):
#   .gl/    the loader debs: apt-get download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2 (amd64)
#   .wwhl/  wheels for the device's Python: wgpu==0.32.0 cffi pycparser rendercanvas
#   .whl/   gguf-0.19.0 wheel
# Run from the repo root; results go to $OUT (or ./out).
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json  # NVIDIA's ICD, not Mesa's
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .wwhl/*.whl .whl/gguf*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
mkdir -p /tmp/models
python3 bench/make_models.py /tmp/models --only smollm2-135m-q4_1 tinyllama-1.1b-q8_0 > "$OUT/make.txt" 2>&1 &
python3 -m kiln devices > "$OUT/devices.txt" 2>&1
timeout 60 python3 -m kiln selftest -b wgpu --full --json "$OUT/selftest_wgpu.json" > "$OUT/selftest_wgpu.txt" 2>&1
timeout 60 python3 bench/wgpu_kernels.py --min-seconds 0.3 > "$OUT/gemv.txt" 2>&1
wait
for n in smollm2-135m-q4_1 tinyllama-1.1b-q8_0; do
  timeout 60 python3 -m kiln bench -m "/tmp/models/$n.gguf" -b wgpu -p 512 -n 128 -r 2 --json "$OUT/wgpu_$n.json"
done
tail -3 "$OUT/selftest_wgpu.txt"; cat "$OUT/gemv.txt"
