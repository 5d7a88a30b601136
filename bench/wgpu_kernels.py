"""Per-kernel throughput of the wgpu GEMVs: GB/s of weights read, for each GGUF format and matrix size.

Many dispatches are recorded into one command encoder and submitted once, so the figure is the kernel's own speed,
not Python's or the submit's. Prints a table and writes JSON (--out).

    python bench/wgpu_kernels.py                       # 7B-sized matrices on a GPU, small ones on a CPU adapter
    python bench/wgpu_kernels.py --sizes 4096x4096,11008x4096 --formats Q4_K,Q8_0 --out gemv.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from gguf import GGMLQuantizationType

from kiln import quant
from kiln.runtime.wgpu_backend import WgpuDevice

FORMATS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
GPU_SIZES = [(4096, 4096), (11008, 4096), (4096, 11008)]
CPU_SIZES = [(1024, 1024), (2816, 1024)]  # lavapipe runs on the host: keep runs short


def time_gemv(dev: WgpuDevice, qtype: GGMLQuantizationType, rows: int, cols: int, min_seconds: float) -> dict:
    rng = np.random.default_rng(0)
    weight = dev.load_weight("w", qtype, quant.random_weight(qtype, rows, cols, rng), (rows, cols))
    x = dev.upload(rng.standard_normal((1, cols), dtype=np.float32))
    out = dev.empty((1, rows))
    dev.matmul(x, weight, out)  # compile and warm up
    dev.sync()
    reps, best = 1, float("inf")
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            dev.matmul(x, weight, out)
        dev.sync()
        elapsed = time.perf_counter() - t0
        best = min(best, elapsed / reps)
        if elapsed >= min_seconds:
            break
        reps *= 4
    nbytes = rows * quant.row_bytes(qtype, cols)
    dev.free_weight(weight)
    dev.free(x)
    dev.free(out)
    return {
        "format": qtype.name,
        "rows": rows,
        "cols": cols,
        "weight_bytes": nbytes,
        "dispatches": reps,
        "us_per_gemv": best * 1e6,
        "gb_per_s": nbytes / best / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", type=int, default=None, help="adapter index (see `kiln devices`)")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--sizes", default=None, help="ROWSxCOLS,... (default: by adapter type)")
    ap.add_argument("--min-seconds", type=float, default=0.3, help="time each case for at least this long")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    dev = WgpuDevice(args.device)
    cpu = dev.adapter.info["adapter_type"] == "CPU"
    sizes = (
        [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
        if args.sizes
        else CPU_SIZES
        if cpu
        else GPU_SIZES
    )
    sizes = [(r, c) for r, c in sizes if r * c * 4 <= dev.max_binding * 4]  # skip what the device cannot hold
    results = []
    print(f"{dev.name}\n{'format':<6} {'rows x cols':>13} {'MB':>8} {'us/GEMV':>10} {'GB/s':>8}")
    for name in args.formats.split(","):
        qtype = GGMLQuantizationType[name]
        for rows, cols in sizes:
            if cols % quant.GGML_QUANT_SIZES[qtype][0]:
                continue
            r = time_gemv(dev, qtype, rows, cols, args.min_seconds)
            results.append(r)
            print(
                f"{name:<6} {rows:>6}x{cols:<6} {r['weight_bytes'] / 1e6:>8.2f} {r['us_per_gemv']:>10.1f} "
                f"{r['gb_per_s']:>8.2f}",
                flush=True,
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": dev.name, "backend": "wgpu", "kernel": "gemv", "results": results}, f, indent=1)
    dev.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
