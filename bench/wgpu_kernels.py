"""Per-kernel throughput of the wgpu GEMVs: GB/s of weights read, for each GGUF format and matrix size.

A step of GEMVs is recorded once and re-encoded many times into one pass; the clock starts after the encoding, so
the figure is the device's time per GEMV (each after a barrier, as in decode), not Python's. On GPUs the GEMVs
rotate through copies of the weight totalling 256 MiB, so it is read from memory as in decode, not from the L2
cache (tables before 2026-11-30's fourth session reused one copy: matrices under ~50 MB were partly L2 reads, and
the first H100 tables in bench/results/h100-wgpu-gemv.txt timed the host's recording too). Prints a table and
writes JSON (--out). On the H200, cases timed after many others' copies were allocated and freed in the same process
ran 2-3x slower (cause not found): for tables, run one format per process, as bench/NOTES.md's were.

    python bench/wgpu_kernels.py                       # 7B-sized matrices on a GPU, small ones on a CPU adapter
    python bench/wgpu_kernels.py --sizes 4096x4096,11008x4096 --formats Q4_K,Q8_0 --out gemv.json
    python bench/wgpu_kernels.py --shapes 32x8,64x4 --formats Q8_0   # GEMV threads x rows per workgroup sweep
    python bench/wgpu_kernels.py --overhead --decode m.gguf --formats none   # per-dispatch cost, decode profile
    python bench/wgpu_kernels.py --formats none --attn --attn-variants v1,v2,v2:16x64 --attn-nkv 128,512,2048
    python bench/wgpu_kernels.py --formats none --attn --attn-variants v2,v3,v3:64x16,v3/wg,v3/l16

--overhead times chains of tiny dispatches (each depends on the one before: the device's cost per dispatch in a
pass, and the CPU's cost to encode one). --decode loads a model, fills 512 cache rows and times decode steps under
each setting (fusion on/off, attention splits, encode-ahead on/off): tokens/s, dispatches per token, and how long
replay() and the argmax readback take on the host. --attn times decode attention alone (time_attention): each
variant KERNEL[:SPLITSxCHUNK][/OPTION...] (KILN_WGPU_ATTN_KERNEL, KILN_WGPU_ATTN; options, for v3: /wg sums a key's
dot product through workgroup memory instead of subgroup shuffles, /lN spreads it over N lanes instead of the head
dim's default) for each head shape and KV length, as a table of us per call with the speed-up over the first
variant. A call's K/V (up to 32 MB for 7B heads at 2048 keys) may stay in the GPU's L2 cache between replays, as it
does not in a real decode step: the figures are latency.
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
from kiln.runtime.base import DTYPES
from kiln.runtime.wgpu_backend import WgpuDevice
from kiln.session import solo

FORMATS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
GPU_SIZES = [(4096, 4096), (11008, 4096), (4096, 11008)]
CPU_SIZES = [(1024, 1024), (2816, 1024)]  # lavapipe runs on the host: keep runs short
COPIES_BYTES = 256 << 20  # GEMV weights replicated past this (over 4x any current GPU's L2 cache): see time_gemv
ATTN_HEADS = [(32, 4, 64), (9, 3, 64), (32, 32, 128)]  # query heads, KV heads, head dim: TinyLlama, SmolLM2, 7B


def _shapes(text: str | None) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in sh.split("x")) for sh in text.split(",")] if text else []


def _variants(text: str | None) -> list[tuple[str | None, tuple[int, int] | None]]:
    """Attention settings KERNEL[:SPLITSxCHUNK] or SPLITSxCHUNK (the default kernel): v1,v2:32x32,16x64."""
    out = []
    for item in text.split(",") if text else []:
        kernel, _, shape = item.rpartition(":") if ":" in item or "x" in item else (item, "", "")
        out.append((kernel or None, _shapes(shape)[0] if shape else None))
    return out


def _use_attention(dev: WgpuDevice, variant: tuple) -> str:
    """Select a (kernel or None for the default, shape or None) attention setting; returns its full name."""
    dev.set_attention(*variant)
    return f"{dev.attn_kernel}:{dev.attn_splits}x{dev.attn_chunk}"


def _attn_variants(text: str) -> list[tuple[tuple, tuple[str, ...]]]:
    """--attn-variants: KERNEL[:SPLITSxCHUNK][/OPTION...] items as (_variants' (kernel, shape), options)."""
    items = [item.split("/") for item in text.split(",")]
    return [(_variants(first)[0], tuple(opts)) for first, *opts in items]


def _use_attention_options(dev: WgpuDevice, options: tuple[str, ...]) -> str:
    """Apply --attn-variants options (/wg: no subgroup shuffles in v3; /lN: v3 lanes per key); their name suffix."""
    dev.use_subgroups = dev.has_subgroups and "wg" not in options
    dev.attn3_lanes = next((int(o[1:]) for o in options if o.startswith("l")), None)
    return "".join(f"/{o}" for o in options)


def device_time(dev: WgpuDevice, key: tuple, step, calls: int, min_seconds: float) -> tuple[float, int]:
    """Seconds of device time per call of a recorded step making `calls` chained calls, and the calls timed: the
    step is re-encoded `reps` times, timed from after the encoding to the end of the work (the host's per-dispatch
    cost is left out; the pass's submission is in)."""
    saved, dev.preencode_enabled = dev.preencode_enabled, False
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
        best = min(best, elapsed / (reps * calls))
        if spent >= min_seconds and reps >= 4:
            break
        reps = min(reps * 2, 64)
    dev.preencode_enabled = saved
    return best, reps * calls


def gemv_copies(dev: WgpuDevice, qtype: GGMLQuantizationType, rows: int, cols: int, copies_bytes: int) -> list:
    """A random weight, replicated on GPUs past copies_bytes (0: one copy) so that GEMVs rotating through the
    copies read it from memory, not from the L2 cache (as in a decode step, where each weight is read once)."""
    raw = quant.random_weight(qtype, rows, cols, np.random.default_rng(0))
    nbytes = rows * quant.row_bytes(qtype, cols)
    copies = 1 if dev.cpu_adapter or not copies_bytes else max(2, -(-copies_bytes // nbytes))
    return [dev.load_weight(f"w{i}", qtype, raw, (rows, cols)) for i in range(copies)]


def time_gemv(dev: WgpuDevice, weights: list, min_seconds: float) -> dict:
    """Device time of one GEMV: a recorded step of GEMVs rotating through `weights` (see device_time)."""
    rows, cols = weights[0].shape
    qtype = weights[0].qtype
    x = dev.upload(np.random.default_rng(1).standard_normal((1, cols), dtype=np.float32))
    out = dev.empty((1, rows))
    batch = max(16, len(weights))
    key = ("gemv-bench", qtype.name, rows, cols, len(weights), dev.gemv_tpr, dev.gemv_rpw, 1)

    def step():
        for i in range(batch):
            dev.matmul(x, weights[i % len(weights)], out)

    best, reps = device_time(dev, key, step, batch, min_seconds)
    dev.free(x)
    dev.free(out)
    nbytes = rows * quant.row_bytes(qtype, cols)
    return {
        "format": qtype.name,
        "rows": rows,
        "cols": cols,
        "weight_bytes": nbytes,
        "weight_copies": len(weights),
        "dispatches": reps,
        "us_per_gemv": best * 1e6,
        "gb_per_s": nbytes / best / 1e9,
    }


def _nmse(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.sum((got - want) ** 2) / np.sum(want**2))


def _attention_reference(q: np.ndarray, kc: np.ndarray, vc: np.ndarray, n_kv: int, n_kv_heads: int) -> np.ndarray:
    """One decode token's attention over the first n_kv cache rows, in float64."""
    hd = kc.shape[-1]
    qg = q.reshape(n_kv_heads, -1, hd).astype(np.float64)
    keys, vals = kc[:, :n_kv].astype(np.float64), vc[:, :n_kv].astype(np.float64)
    s = qg @ keys.transpose(0, 2, 1) / np.sqrt(hd)
    w = np.exp(s - s.max(-1, keepdims=True))
    return ((w / w.sum(-1, keepdims=True)) @ vals).reshape(-1)


def time_attention(dev: WgpuDevice, heads: tuple, n_kvs: list[int], variants: list[tuple], calls: int, seconds: float):
    """Device time of one decode attention (the `attend` op: the kernel(s) after the KV-cache write) for each
    variant ((kernel, SPLITSxCHUNK), options) and KV length: a recorded step of `calls` chained calls, each over
    its own KV cache (like layers), context n_ctx = max(n_kvs). The recorded step reads the KV length from the pos
    buffer, so one recording serves every n_kv. Each variant's output is checked against a float64 reference."""
    hq, hkv, hd = heads
    n_ctx = max(n_kvs)
    rng = np.random.default_rng(0)
    kv = dev.kv_dtype
    q_host = rng.standard_normal((1, hq * hd), dtype=np.float32)
    caches_host = [rng.standard_normal((2, hkv, n_ctx, hd)).astype(DTYPES[kv]) for _ in range(min(calls, 2))]
    q = dev.upload(q_host)
    caches = [[dev.upload(caches_host[i % len(caches_host)][j]) for j in (0, 1)] for i in range(calls)]
    outs = [dev.empty((1, hq * hd)) for _ in range(calls)]
    pos = dev.upload(np.zeros(1, np.int32))
    saved = dev.attn_kernel, (dev.attn_splits, dev.attn_chunk), dev.use_subgroups, dev.attn3_lanes
    rows = []
    for variant, options in variants:
        name = _use_attention(dev, variant) + _use_attention_options(dev, options)
        key = ("attn-bench", heads, n_ctx, name, 1)

        def step():
            for (kc, vc), out in zip(caches, outs):
                dev._op("attend", q, kc, vc, pos, out, hq, hkv, hd)

        v3 = dev._attn3_defs(hd, hq // hkv, n_ctx, kv) if dev.attn_kernel == "v3" else None
        for n_kv in n_kvs:
            dev.write(pos, np.array([n_kv - 1], np.int32))
            best, reps = device_time(dev, key, step, calls, seconds)
            want = [_attention_reference(q_host, c[0], c[1], n_kv, hkv) for c in caches_host]
            err = max(_nmse(outs[i].numpy().reshape(-1), want[i % len(want)]) for i in {0, calls // 2, calls - 1})
            rows.append(
                {
                    "heads": f"{hq}/{hkv}/{hd}",
                    "variant": name,
                    "v2_tile": dev._attn2_defs(hd, hq // hkv, n_ctx, kv)["TILE"] if dev.attn_kernel == "v2" else None,
                    "v3_shape": {k: v3[k] for k in ("LPK", "U", "TILE", "NS")} if v3 else None,
                    "n_ctx": n_ctx,
                    "n_kv": n_kv,
                    "calls": reps,
                    "us_per_call": best * 1e6,
                    "nmse_vs_f64": err,
                    "ok": err < 1e-6,
                }
            )
        dev._forget_steps()
    dev.set_attention(saved[0], saved[1])
    dev.use_subgroups, dev.attn3_lanes = saved[2:]
    for t in [q, pos, *outs, *(c for pair in caches for c in pair)]:
        dev.free(t)
    return rows


def print_attention(rows: list[dict]) -> None:
    """One line per (heads, n_kv): us per call of each variant, and each one's speed-up over the first."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    print(f"{'q/kv/hd heads':<14} {'n_kv':>6} " + " ".join(f"{v:>16}" for v in variants) + "  (us per call)")
    for heads in dict.fromkeys(r["heads"] for r in rows):
        for n_kv in dict.fromkeys(r["n_kv"] for r in rows if r["heads"] == heads):
            got = {r["variant"]: r for r in rows if r["heads"] == heads and r["n_kv"] == n_kv}
            base = got[variants[0]]["us_per_call"]
            cells = [
                f"{got[v]['us_per_call']:8.2f} ({base / got[v]['us_per_call']:4.2f}x)"
                + ("" if got[v]["ok"] else " WRONG")
                for v in variants
            ]
            print(f"{heads:<14} {n_kv:>6} " + " ".join(f"{c:>16}" for c in cells), flush=True)


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


def time_timeline(path: str, prompt: int = 512, device: int | None = None, steps: int = 5) -> dict:
    """Device time per kernel of one decode step (WgpuDevice.timeline: a timestamp after every dispatch), the
    fastest of `steps` runs per dispatch; prints the totals by kernel and the first layer's dispatches in order."""
    from kiln import gguf
    from kiln.model import Model

    dev = WgpuDevice(device, timestamps=True)
    f = gguf.load(path)
    model = Model(f, dev, n_ctx=prompt + 8)
    solo(model).prefill([int(i) % f.config.vocab_size for i in range(1, prompt + 1)])
    for _ in range(2):  # the first step records the plan, the second replays it
        solo(model).rewind(prompt)
        dev.argmax(solo(model).step([1]))
    runs = [dev.timeline() for _ in range(steps)]
    names = [name for name, _ in runs[0]]
    us = np.min([[t for _, t in run] for run in runs], axis=0)
    totals: dict[str, list] = {}
    for name, t in zip(names, us):
        totals.setdefault(name, [0, 0.0])
        totals[name][0] += 1
        totals[name][1] += float(t)
    print(f"{os.path.basename(path)} on {dev.name}: {len(names)} dispatches, {us.sum():.1f} us of device time")
    for name, (count, total) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:<16} x{count:<4} {total:9.1f} us  {total / count:7.2f} us each")
    layer = names.index("gemv_qkv") if "gemv_qkv" in names else 0
    print("  first layer:", ", ".join(f"{n} {t:.1f}" for n, t in zip(names[layer : layer + 6], us[layer : layer + 6])))
    model.close()
    dev.close()
    return {
        "model": os.path.basename(path),
        "device": dev.name,
        "us_total": float(us.sum()),
        "by_kernel": {k: {"count": c, "us": t} for k, (c, t) in totals.items()},
        "dispatches": [[n, float(t)] for n, t in zip(names, us)],
    }


def time_decode(path: str, tokens: int = 64, prompt: int = 512, shapes=(), attns=()) -> list[dict]:
    """Decode tokens/s of one model under each setting, from a cache holding `prompt` rows. Each setting's first
    logits and greedy tokens are checked against the first setting's (unfused: the ops one by one)."""
    from kiln import gguf
    from kiln.model import Model

    dev = WgpuDevice()
    f = gguf.load(path)
    model = Model(f, dev, n_ctx=prompt + tokens + 8)
    ids = [int(i) % f.config.vocab_size for i in range(1, prompt + 1)]
    solo(model).prefill(ids)
    dev.argmax(solo(model).step([1]))
    own = dev.gemv_tpr, dev.gemv_rpw
    attn = _use_attention(dev, (None, None))
    attns = list(dict.fromkeys(_use_attention(dev, a) for a in attns))  # full names, in order, once each
    settings = [
        {"fuse": False, "attn": attn, "ahead": False, "shape": own},
        {"fuse": True, "attn": attn, "ahead": False, "shape": own},
        {"fuse": True, "attn": attn, "ahead": True, "shape": own},
    ]
    settings += [{"fuse": True, "attn": a, "ahead": True, "shape": own} for a in attns if a != attn]
    settings += [{"fuse": True, "attn": attn, "ahead": True, "shape": sh} for sh in shapes if sh != own]
    out, base = [], None
    for st in settings:
        dev.fuse_enabled, dev.preencode_enabled = st["fuse"], st["ahead"]
        kernel, shape = st["attn"].split(":")
        dev.set_attention(kernel, _shapes(shape)[0])
        dev.gemv_tpr, dev.gemv_rpw = st["shape"]
        dev._forget_steps()
        times = []
        for _rep in range(2):
            solo(model).rewind(prompt)
            first = dev.download(solo(model).step([1]))[0]  # records the step for this setting
            solo(model).rewind(prompt)
            token, replay_s, read_s, seq = 1, 0.0, 0.0, []
            d0 = dev.dispatches
            t0 = time.perf_counter()
            for _ in range(tokens):
                r0 = time.perf_counter()
                logits = solo(model).step([token])
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
            "shape": "auto" if st["shape"][0] is None else f"{st['shape'][0]}x{st['shape'][1]}",
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
            f"{row['model']:<24} fuse={int(st['fuse'])} attn={row['attn']:<11} ahead={int(st['ahead'])} "
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
    ap.add_argument(
        "--copies-mb", type=int, default=COPIES_BYTES >> 20, help="GEMV weight copies total (0: one, L2-hot)"
    )
    ap.add_argument("--overhead", action="store_true", help="time the cost of one dispatch")
    ap.add_argument("--decode", nargs="*", default=[], help="GGUF models to profile decode steps of")
    ap.add_argument("--decode-prompt", type=int, default=512, help="cache rows filled before the decode steps")
    ap.add_argument("--decode-tokens", type=int, default=64, help="decode steps timed per setting")
    ap.add_argument("--decode-shapes", default=None, help="GEMV shapes THREADSxROWS,... to decode with as well")
    ap.add_argument(
        "--decode-attn", default=None, help="attention [KERNEL:]SPLITSxCHUNK or KERNEL,... to decode with as well"
    )
    ap.add_argument("--timeline", nargs="*", default=[], help="GGUF models to time each decode kernel of")
    ap.add_argument("--attn", action="store_true", help="time decode attention (see time_attention)")
    ap.add_argument("--attn-heads", default=None, help="QHEADSxKVHEADSxHEADDIM,... (default: ATTN_HEADS)")
    ap.add_argument("--attn-nkv", default=None, help="KV lengths, e.g. 128,512,2048 (default by adapter type)")
    ap.add_argument(
        "--attn-variants", default="v1,v2", help="KERNEL[:SPLITSxCHUNK][/OPTION...],... (first: the baseline)"
    )
    ap.add_argument("--attn-calls", type=int, default=16, help="chained attention calls per timed step")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    report: dict = {"backend": "wgpu", "kernel": "gemv"}
    if args.timeline:
        report["timeline"] = [time_timeline(path, args.decode_prompt, args.device) for path in args.timeline]
    if args.decode:
        report["decode"] = [
            row
            for path in args.decode
            for row in time_decode(
                path, args.decode_tokens, args.decode_prompt, _shapes(args.decode_shapes), _variants(args.decode_attn)
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
    if args.attn:
        nkv = [int(n) for n in (args.attn_nkv or ("64,256" if cpu else "128,512,2048")).split(",")]
        heads = (
            [tuple(int(v) for v in h.split("x")) for h in args.attn_heads.split(",")] if args.attn_heads else ATTN_HEADS
        )
        report["attention"] = [
            row
            for h in heads
            for row in time_attention(
                dev, h, nkv, _attn_variants(args.attn_variants), args.attn_calls, args.min_seconds
            )
        ]
        print(dev.name)
        print_attention(report["attention"])
    if args.overhead:
        report["overhead"] = time_overhead(dev)
        print(f"dispatch cost: {json.dumps(report['overhead'])}", flush=True)
    shapes = _shapes(args.shapes) or [None]
    results = []
    print(f"{dev.name}\n{'format':<6} {'shape':>6} {'rows x cols':>13} {'MB':>8} {'us/GEMV':>10} {'GB/s':>8}")
    for name in [f for f in args.formats.split(",") if f != "none"]:
        qtype = GGMLQuantizationType[name]
        for rows, cols in sizes:
            if cols % quant.GGML_QUANT_SIZES[qtype][0]:
                continue
            weights = gemv_copies(dev, qtype, rows, cols, args.copies_mb << 20)
            for shape in shapes:
                if shape is not None:
                    dev.gemv_tpr, dev.gemv_rpw = shape
                r = time_gemv(dev, weights, args.min_seconds)
                r["shape"] = "x".join(map(str, dev._gemv_shape(cols, rows)))
                results.append(r)
                print(
                    f"{name:<6} {r['shape']:>6} {rows:>6}x{cols:<6} {r['weight_bytes'] / 1e6:>8.2f} "
                    f"{r['us_per_gemv']:>10.1f} {r['gb_per_s']:>8.2f}",
                    flush=True,
                )
            for w in weights:
                dev.free_weight(w)
    report["results"] = results
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    dev.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
