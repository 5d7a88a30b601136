"""Per-kernel throughput of the wgpu GEMVs: GB/s of weights read, for each GGUF format and matrix size.

A step of 16 GEMVs is recorded once and re-encoded many times into one pass; the clock starts after the encoding, so
the figure is the device's time per GEMV (each after a barrier, as in decode), not Python's. (The first H100 tables
in bench/results/h100-wgpu-gemv.txt timed the host's recording too.) Prints a table and writes JSON (--out).

    python bench/wgpu_kernels.py                       # 7B-sized matrices on a GPU, small ones on a CPU adapter
    python bench/wgpu_kernels.py --sizes 4096x4096,11008x4096 --formats Q4_K,Q8_0 --out gemv.json
    python bench/wgpu_kernels.py --shapes 32x8,64x4 --formats Q8_0   # GEMV threads x rows per workgroup sweep
    python bench/wgpu_kernels.py --overhead --decode m.gguf --formats none   # per-dispatch cost, decode profile

--overhead times chains of tiny dispatches (each depends on the one before: the device's cost per dispatch in a
pass, and the CPU's cost to encode one). --decode loads a model, fills 512 cache rows and times decode steps under
each setting (fusion on/off, attention splits, encode-ahead on/off): tokens/s, dispatches per token, and how long
replay() and the argmax readback take on the host.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from gguf import GGMLQuantizationType

from kiln import quant
from kiln.runtime.wgpu_backend import WgpuDevice

FORMATS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
GPU_SIZES = [(4096, 4096), (11008, 4096), (4096, 11008)]
CPU_SIZES = [(1024, 1024), (2816, 1024)]  # lavapipe runs on the host: keep runs short


def _shapes(text: str | None) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in sh.split("x")) for sh in text.split(",")] if text else []


def time_gemv(dev: WgpuDevice, qtype: GGMLQuantizationType, rows: int, cols: int, min_seconds: float) -> dict:
    """Device time of one GEMV: a recorded step of BATCH GEMVs re-encoded `reps` times, timed from after the
    encoding to the end of the work (so the host's per-dispatch cost is left out; the pass's submission is in)."""
    rng = np.random.default_rng(0)
    weight = dev.load_weight("w", qtype, quant.random_weight(qtype, rows, cols, rng), (rows, cols))
    x = dev.upload(rng.standard_normal((1, cols), dtype=np.float32))
    out = dev.empty((1, rows))
    batch, key = 16, ("gemv-bench", qtype.name, rows, cols, dev.gemv_tpr, dev.gemv_rpw, 1)
    saved, dev.preencode_enabled = dev.preencode_enabled, False

    def step():
        for _ in range(batch):
            dev.matmul(x, weight, out)

    dev.replay(key, step)  # compile, record, warm up
    dev.sync()
    reps, best, spent = 1, float("inf"), 0.0
    while True:
        for _ in range(reps):
            dev.replay(key, step)
        t0 = time.perf_counter()
        dev.sync()
        elapsed = time.perf_counter() - t0
        spent += elapsed
        best = min(best, elapsed / (reps * batch))
        if spent >= min_seconds and reps >= 4:
            break
        reps = min(reps * 2, 64)
    dev.preencode_enabled = saved
    reps *= batch
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


def time_overhead(dev: WgpuDevice, n: int = 400) -> dict:
    """Device and host cost of one dispatch: a recorded step of n chained one-element adds, replayed (re-encoded)
    and submitted at once, as decode steps are."""
    a = dev.upload(np.ones((1, 1), np.float32))
    b = dev.upload(np.ones((1, 1), np.float32))
    saved, dev.preencode_enabled = dev.preencode_enabled, False

    def step():
        for _ in range(n):
            dev.add(a, b, a)

    dev.replay(("overhead", 1), step)
    dev.sync()
    best_enc = best_dev = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dev.replay(("overhead", 1), step)
        t1 = time.perf_counter()
        dev.sync()
        t2 = time.perf_counter()
        best_enc, best_dev = min(best_enc, t1 - t0), min(best_dev, t2 - t1)
    dev.preencode_enabled = saved
    dev.free(a)
    dev.free(b)
    return {"dispatches": n, "host_encode_us": best_enc / n * 1e6, "device_us_per_dispatch": best_dev / n * 1e6}


def time_decode(path: str, tokens: int = 64, prompt: int = 512, shapes=(), attns=()) -> list[dict]:
    """Decode tokens/s of one model under each setting, from a cache holding `prompt` rows. Each setting's first
    logits and greedy tokens are checked against the first setting's (unfused: the ops one by one)."""
    from kiln import gguf
    from kiln.model import Model

    dev = WgpuDevice()
    f = gguf.load(path)
    model = Model(f, dev, n_ctx=prompt + tokens + 8)
    ids = [int(i) % f.config.vocab_size for i in range(1, prompt + 1)]
    model.prefill(ids)
    dev.argmax(model.step([1]))
    own, attn = (dev.gemv_tpr, dev.gemv_rpw), (dev.attn_splits, dev.attn_chunk)
    settings = [
        {"fuse": False, "attn": attn, "ahead": False, "shape": own},
        {"fuse": True, "attn": attn, "ahead": False, "shape": own},
        {"fuse": True, "attn": attn, "ahead": True, "shape": own},
    ]
    settings += [{"fuse": True, "attn": a, "ahead": True, "shape": own} for a in attns if a != attn]
    settings += [{"fuse": True, "attn": attn, "ahead": True, "shape": sh} for sh in shapes if sh != own]
    out, base = [], None
    for st in settings:
        dev.fuse_enabled, (dev.attn_splits, dev.attn_chunk), dev.preencode_enabled = st["fuse"], st["attn"], st["ahead"]
        dev.gemv_tpr, dev.gemv_rpw = st["shape"]
        dev._forget_steps()
        times = []
        for _rep in range(2):
            model.tokens = model.tokens[:prompt]
            first = dev.download(model.step([1]))[0]  # records the step for this setting
            model.tokens = model.tokens[:prompt]
            token, replay_s, read_s, seq = 1, 0.0, 0.0, []
            d0 = dev.dispatches
            t0 = time.perf_counter()
            for _ in range(tokens):
                r0 = time.perf_counter()
                logits = model.step([token])
                r1 = time.perf_counter()
                token = dev.argmax(logits)
                seq.append(token)
                replay_s += r1 - r0
                read_s += time.perf_counter() - r1
            times.append((time.perf_counter() - t0, replay_s, read_s, (dev.dispatches - d0) / tokens))
        total, replay_s, read_s, per_token = min(times)
        if base is None:
            base = (first, seq)
        err = float(np.sum((first - base[0]) ** 2) / np.sum(base[0] ** 2))
        same = next((i for i, (a, b) in enumerate(zip(seq, base[1])) if a != b), len(seq))
        row = {
            **st,
            "shape": f"{st['shape'][0]}x{st['shape'][1]}",
            "attn": f"{st['attn'][0]}x{st['attn'][1]}",
            "model": os.path.basename(path),
            "tok_s": tokens / total,
            "ms_per_token": total / tokens * 1e3,
            "dispatches_per_token": per_token,
            "host_step_ms": replay_s / tokens * 1e3,
            "argmax_wait_ms": read_s / tokens * 1e3,
            "logits_nmse_vs_first": err,
            "greedy_tokens_equal_to_first": same,
        }
        out.append(row)
        print(
            f"{row['model']:<24} fuse={int(st['fuse'])} attn={row['attn']:<5} ahead={int(st['ahead'])} "
            f"{row['shape']:>5} {row['tok_s']:7.1f} tok/s {row['ms_per_token']:6.2f} ms {per_token:4.0f} disp "
            f"step() {row['host_step_ms']:.2f} ms argmax+wait {row['argmax_wait_ms']:.2f} ms "
            f"nmse {err:.1e} same {same}/{tokens}",
            flush=True,
        )
    model.close()
    dev.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", type=int, default=None, help="adapter index (see `kiln devices`)")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--sizes", default=None, help="ROWSxCOLS,... (default: by adapter type)")
    ap.add_argument("--min-seconds", type=float, default=0.3, help="time each case for at least this long")
    ap.add_argument("--shapes", default=None, help="GEMV shapes THREADSxROWS,... (default: the adapter's own)")
    ap.add_argument("--overhead", action="store_true", help="time the cost of one dispatch")
    ap.add_argument("--decode", nargs="*", default=[], help="GGUF models to profile decode steps of")
    ap.add_argument("--decode-prompt", type=int, default=512, help="cache rows filled before the decode steps")
    ap.add_argument("--decode-tokens", type=int, default=64, help="decode steps timed per setting")
    ap.add_argument("--decode-shapes", default=None, help="GEMV shapes THREADSxROWS,... to decode with as well")
    ap.add_argument("--decode-attn", default=None, help="attention SPLITSxCHUNK,... to decode with as well")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    report: dict = {"backend": "wgpu", "kernel": "gemv"}
    if args.decode:
        report["decode"] = [
            row
            for path in args.decode
            for row in time_decode(
                path, args.decode_tokens, args.decode_prompt, _shapes(args.decode_shapes), _shapes(args.decode_attn)
            )
        ]

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
    report["device"] = dev.name
    if args.overhead:
        report["overhead"] = time_overhead(dev)
        print(f"dispatch cost: {json.dumps(report['overhead'])}", flush=True)
    shapes = _shapes(args.shapes) or [None]
    results = []
    print(f"{dev.name}\n{'format':<6} {'shape':>6} {'rows x cols':>13} {'MB':>8} {'us/GEMV':>10} {'GB/s':>8}")
    for name in [f for f in args.formats.split(",") if f != "none"]:
        qtype = GGMLQuantizationType[name]
        for shape in shapes:
            if shape is not None:
                dev.gemv_tpr, dev.gemv_rpw = shape
            for rows, cols in sizes:
                if cols % quant.GGML_QUANT_SIZES[qtype][0]:
                    continue
                r = time_gemv(dev, qtype, rows, cols, args.min_seconds)
                r["shape"] = f"{dev.gemv_tpr}x{dev.gemv_rpw}"
                results.append(r)
                print(
                    f"{name:<6} {r['shape']:>6} {rows:>6}x{cols:<6} {r['weight_bytes'] / 1e6:>8.2f} "
                    f"{r['us_per_gemv']:>10.1f} {r['gb_per_s']:>8.2f}",
                    flush=True,
                )
    report["results"] = results
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    dev.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
