"""What one NCCL all-reduce costs inside a CUDA graph, as kiln's tensor-parallel decode runs it: one process, a thread
per GPU, communicators from ncclCommInitAll, in-place f32 sums captured into a graph per rank and replayed.

    python bench/tp_allreduce.py --sweep --json OUT.json     # every NCCL setting below, each in its own process
    python bench/tp_allreduce.py --one                       # this process's environment only (one JSON line)

Sizes: d_model of Llama-7B (4096 floats, 16 KB) and Llama-70B (8192, 32 KB): the decode all-reduces; 512 x 4096
(8 MB): a pp512 prefill all-reduce of 7B. Per size, a graph of K back-to-back all-reduces is replayed R times, each
timed replay right behind an untimed one so both GPUs start it in step (host threads do not); the figure is the
median graph time / K (microseconds per all-reduce). NCCL reads its environment once per process,
hence one process per setting. NCCL_NVLS_ENABLE=0 (no NVLink multicast) is forced in every one of them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading

SIZES = (4096, 8192, 512 * 4096)
SETTINGS = {  # name -> NCCL environment on top of the default
    "default": {},
    "proto_LL": {"NCCL_PROTO": "LL"},
    "proto_LL128": {"NCCL_PROTO": "LL128"},
    "proto_Simple": {"NCCL_PROTO": "Simple"},
    "algo_Tree": {"NCCL_ALGO": "Tree"},
    "channels_1": {"NCCL_MAX_NCHANNELS": "1"},
    "channels_2": {"NCCL_MAX_NCHANNELS": "2"},
    "channels_1_LL": {"NCCL_MAX_NCHANNELS": "1", "NCCL_PROTO": "LL"},
    "min_channels_8": {"NCCL_MIN_NCHANNELS": "8"},
    "graph_mixing_0": {"NCCL_GRAPH_MIXING_SUPPORT": "0"},  # measured only: kiln mixes graph and eager calls
    # Buffers from ncclMemAlloc registered as a symmetric window (NCCL >= 2.27): NCCL's symmetric kernels.
    "window": {"KILN_TP_BENCH_WINDOW": "1"},
    "window_LL": {"KILN_TP_BENCH_WINDOW": "1", "NCCL_PROTO": "LL"},
    # Measured only: 2.8 us per 16 KB, but kiln's replayed decode graphs then sum wrongly (greedy tokens diverge
    # from one GPU's within 5 tokens), even with graph and eager calls on separate communicators.
    "window_mixing_0": {"KILN_TP_BENCH_WINDOW": "1", "NCCL_GRAPH_MIXING_SUPPORT": "0"},
}


def measure(n_gpus: int, sizes: tuple[int, ...], k: int, reps: int) -> dict:
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    from kiln.tp import _import_nccl, _NcclWindows

    nccl = _import_nccl()
    import cupy

    comms = nccl.NcclCommunicator.initAll(list(range(n_gpus)))
    windows = None  # kiln's own symmetric windows (kiln.tp._NcclWindows), one per rank
    if os.environ.get("KILN_TP_BENCH_WINDOW") == "1":
        windows = _NcclWindows(comms, list(range(n_gpus)), 4 * max(sizes))
    barrier = threading.Barrier(n_gpus)
    out: dict = {"nccl": nccl.get_version(), "gpus": n_gpus, "k": k, "reps": reps, "sizes": {}, "window": bool(windows)}
    errors: list = []

    def rank(r: int) -> None:
        try:
            cupy.cuda.Device(r).use()
            s = cupy.cuda.Stream(non_blocking=True)
            window = None
            if windows is not None:
                mem = cupy.cuda.UnownedMemory(windows.base(r), windows.nbytes, None, r)
                window = cupy.ndarray((windows.nbytes // 4,), cupy.float32, cupy.cuda.MemoryPointer(mem, 0))
            for n in sizes:
                if window is None:
                    buf = cupy.full(n, float(r + 1), cupy.float32)
                else:
                    buf = window[:n]
                    buf.fill(float(r + 1))
                ptr = buf.data.ptr

                def ar(ptr: int = ptr, n: int = n) -> None:
                    comms[r].allReduce(ptr, ptr, n, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, s.ptr)

                ar()  # correctness: sum of 1..n_gpus
                s.synchronize()
                ok = bool((buf == n_gpus * (n_gpus + 1) / 2).all())
                buf.fill(0)
                barrier.wait()
                with s:
                    s.begin_capture()
                    for _ in range(k):
                        ar()
                    graph = s.end_capture()
                graph.upload(s)
                times = []
                for _ in range(reps + 2):
                    barrier.wait()
                    e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
                    graph.launch(s)  # absorbs the ranks' start skew: the timed graph starts in step on both
                    e0.record(s)
                    graph.launch(s)
                    e1.record(s)
                    e1.synchronize()
                    times.append(cupy.cuda.get_elapsed_time(e0, e1) * 1000 / k)
                # eager: the host enqueue time of one all-reduce, then the device time of k in a row
                barrier.wait()
                e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
                graph.launch(s)
                e0.record(s)
                for _ in range(k):
                    ar()
                e1.record(s)
                e1.synchronize()
                if r == 0:
                    out["sizes"][str(n)] = {
                        "bytes": 4 * n,
                        "graph_us_per_allreduce": statistics.median(times[2:]),
                        "graph_us_min": min(times[2:]),
                        "eager_us_per_allreduce": cupy.cuda.get_elapsed_time(e0, e1) * 1000 / k,
                        "sum_ok": ok,
                    }
                del graph
            s.synchronize()
        except BaseException as e:  # reported, and the barrier freed for the other ranks
            errors.append(f"rank {r}: {type(e).__name__}: {e}")
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(n_gpus)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if windows is not None:
        windows.release(comms)
    for c in comms:
        c.destroy()
    if errors:
        out["error"] = "; ".join(errors)
    return out


def sweep(args) -> list[dict]:
    results = []
    for name, env in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        full = {**os.environ, **env, "NCCL_NVLS_ENABLE": "0"}
        cmd = [sys.executable, __file__, "--one", "--gpus", str(args.gpus), "-k", str(args.k), "-r", str(args.reps)]
        try:
            proc = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=args.timeout)
            line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            res = json.loads(line) if line.startswith("{") else {"error": proc.stderr[-1500:]}
        except subprocess.TimeoutExpired:
            res = {"error": f"timed out after {args.timeout} s"}
        res.update(setting=name, env=env)
        results.append(res)
        row = " ".join(
            f"{int(n) * 4 // 1024} KB {v['graph_us_per_allreduce']:.1f} us" for n, v in res.get("sizes", {}).items()
        )
        print(f"{name:16s} {row or res.get('error', '')[-300:]}", flush=True)
    return results


# What --best-env may pick for kiln to run with: not graph mixing off, and not the window settings (not NCCL variables:
# kiln registers its own window, KILN_TP_WINDOW).
SAFE = {name for name in SETTINGS if name != "graph_mixing_0" and not name.startswith("window")}


def best(results: list[dict], size: int) -> dict:
    """The safe setting with the lowest in-graph time at `size` floats (ties: the default's order)."""
    ok = [
        r
        for r in results
        if r.get("setting") in SAFE and str(size) in r.get("sizes", {}) and r["sizes"][str(size)]["sum_ok"]
    ]
    return min(ok, key=lambda r: r["sizes"][str(size)]["graph_us_per_allreduce"]) if ok else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", action="store_true", help="measure with this process's environment only")
    ap.add_argument("--sweep", action="store_true", help="measure every setting, each in its own process")
    ap.add_argument("--only", nargs="*", help="settings of the sweep to run")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("-k", type=int, default=64, help="all-reduces per graph (a 32-layer decode step has 64)")
    ap.add_argument("-r", "--reps", type=int, default=20)
    ap.add_argument("--timeout", type=int, default=60)
    ap.add_argument("--json", help="write the sweep here")
    ap.add_argument("--best-env", type=int, metavar="FLOATS", help="after the sweep, print the best env for this size")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.gpus, SIZES, args.k, args.reps)), flush=True)
        return
    results = sweep(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    if args.best_env:
        b = best(results, args.best_env)
        print("BEST " + " ".join(f"{k}={v}" for k, v in b.get("env", {}).items()), flush=True)


if __name__ == "__main__":
    main()
