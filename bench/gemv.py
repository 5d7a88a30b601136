"""GEMV bandwidth of the CUDA backend on 7B-sized matrices: GB/s of weights read per second, next to a plain
device-to-device copy (the practical ceiling). Each matrix is replicated past 4x the L2 cache and the launches
rotate through the copies, so the weights come from HBM; timing is a CUDA graph of many launches between events.

    python bench/gemv.py [--json PATH] [--formats Q8_0 Q4_K ...] [--shapes 7b tinyllama] [--configs warp block:8:1]

A config is `warp` (the warp kernel), `block:R:G:T` (the register block kernel: R rows per group, G groups per
block, 0 = the backend's choice; at most T threads per block) or `pipe:R:S:T` (the pipelined block kernel: S stages);
`auto` is the backend's own choice per shape (see CudaDevice._gemv_shape).
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
from gguf import GGMLQuantizationType as Q

from kiln import quant
from kiln.runtime import get_device

SHAPES = {  # (N, K): wq/wo, gate/up, down, output head
    "7b": [(4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096)],
    "tinyllama": [(2048, 2048), (5632, 2048), (2048, 5632), (32000, 2048)],
}


def set_config(dev, config: str) -> None:
    kind, *rest = config.split(":")
    nums = [int(v) for v in rest] + [0, 0, 0]
    dev.gemv_kernel = kind
    dev.gemv_rows = nums[0]
    dev.gemv_groups_per_block = nums[1] if kind == "block" else 0
    dev.gemv_stages = nums[1] if kind == "pipe" else 0
    dev.gemv_max_threads = nums[2] or 512


def graph_time(dev, launch, n_launch: int, reps: int = 5, pdl: bool = False) -> float:
    """Seconds per launch: a graph of n_launch launches, replayed `reps` times, median."""
    import cupy

    s = dev.stream
    dev._capture_ptrs = [] if pdl else None  # the backend's own captures launch with PDL
    try:
        with s:
            s.begin_capture()
            for i in range(n_launch):
                launch(i)
            g = s.end_capture()
    finally:
        dev._capture_ptrs = None
    g.launch(s)
    s.synchronize()
    times = []
    for _ in range(reps):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record(s)
        g.launch(s)
        b.record(s)
        b.synchronize()
        times.append(cupy.cuda.get_elapsed_time(a, b) / 1e3 / n_launch)
    return statistics.median(times)


def copy_bandwidth(dev, nbytes: int = 1 << 30) -> float:
    import cupy

    with dev.stream:
        a = cupy.ones(nbytes // 4, np.float32)
        b = cupy.empty_like(a)
    t = graph_time(dev, lambda i: b.data.copy_from_device_async(a.data, nbytes, dev.stream), 10)
    return 2 * nbytes / t / 1e9


_READ_SRC = r"""
extern "C" __global__ void read_all(const uint4* __restrict__ a, unsigned int* out, unsigned long long n) {
    unsigned int acc = 0;
#pragma unroll 8
    const unsigned long long step = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        uint4 v = __ldg(a + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9E3779B9u) out[0] = acc;  // never true for the data used; keeps the loads
}
"""


def read_bandwidth(dev, nbytes: int = 1 << 30) -> float:
    """A read-only stream (what a GEMV does): 16-byte loads over 1 GiB, GB/s read."""
    import cupy

    with dev.stream:
        a = cupy.ones(nbytes // 4, np.float32)
        out = cupy.zeros(1, np.uint32)
    k = cupy.RawKernel(_READ_SRC, "read_all")
    grid = dev.sm_count * 8
    t = graph_time(dev, lambda i: k((grid,), (512,), (a, out, np.uint64(nbytes // 16))), 10)
    return nbytes / t / 1e9


def gemv_bandwidth(dev, fmt: str, N: int, K: int, l2_bytes: int, pdl: bool = False) -> dict:
    qt = Q[fmt]
    rng = np.random.default_rng(0)
    raw = quant.random_weight(qt, N, K, rng)
    copies = max(2, -(-4 * l2_bytes // raw.nbytes))
    weights = [dev.load_weight(f"w{i}", qt, raw, (N, K)) for i in range(copies)]
    x = dev.upload(rng.standard_normal((1, K), dtype=np.float32))
    out = dev.empty((1, N))
    try:
        dev.matmul(x, weights[0], out)  # compile
        ref = quant.dequantize(raw, qt, K) @ dev.download(x)[0]
        err = float(np.abs(dev.download(out)[0] - ref).max() / np.abs(ref).max())
        t = graph_time(dev, lambda i: dev.matmul(x, weights[i % copies], out), 20 * copies, pdl=pdl)
    finally:
        for w in weights:
            dev.free_weight(w)
        dev.free(x)
        dev.free(out)
    return {
        "format": fmt,
        "pdl": pdl,
        "N": N,
        "K": K,
        "bytes": raw.nbytes,
        "us": t * 1e6,
        "gb_s": raw.nbytes / t / 1e9,
        "max_rel_err": err,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", nargs="*", default=["Q8_0", "Q4_0", "Q4_K", "Q6_K", "F16"])
    ap.add_argument("--shapes", nargs="*", default=["7b"], choices=sorted(SHAPES))
    ap.add_argument("--configs", nargs="*", default=["auto"], help="auto, warp, block:R:G:T or pipe:R:S:T (see above)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--pdl", action="store_true", help="launch with programmatic dependent launch, as decode graphs do")
    args = ap.parse_args()
    import cupy

    dev = get_device("cuda")
    l2 = cupy.cuda.runtime.getDeviceProperties(dev.index)["l2CacheSize"]
    ceiling = copy_bandwidth(dev)
    read = read_bandwidth(dev)
    print(
        f"{dev.name}: device-to-device copy {ceiling:.0f} GB/s (read + write), read-only stream {read:.0f} GB/s, "
        f"L2 {l2 >> 20} MiB, PDL {'on' if args.pdl and dev.pdl_enabled else 'off'}"
    )
    rows = []
    head = f"{'config':<14} {'format':<6} {'N':>6} {'K':>6} {'MiB':>7} {'us':>8} {'GB/s':>7}"
    print(head + f" {'% copy':>7} {'% read':>7} {'err':>8}")
    for config in args.configs:
        set_config(dev, config)
        for fmt in args.formats:
            for N, K in [s for name in args.shapes for s in SHAPES[name]]:
                r = gemv_bandwidth(dev, fmt, N, K, l2, args.pdl and dev.pdl_enabled)
                r["config"] = config
                r["pct_of_copy"] = 100 * r["gb_s"] / ceiling
                r["pct_of_read"] = 100 * r["gb_s"] / read
                rows.append(r)
                print(
                    f"{config:<14} {fmt:<6} {N:>6} {K:>6} {r['bytes'] / 2**20:>7.1f} {r['us']:>8.1f} "
                    f"{r['gb_s']:>7.0f} {r['pct_of_copy']:>6.0f}% {r['pct_of_read']:>6.0f}% {r['max_rel_err']:>8.1e}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as fh:
            result = {"device": dev.name, "copy_gb_s": ceiling, "read_gb_s": read, "l2_bytes": l2, "gemv": rows}
            json.dump(result, fh, indent=1)
    dev.close()


if __name__ == "__main__":
    main()
