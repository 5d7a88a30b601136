"""Where a tensor-parallel decode step's time goes, in one process: for each L2 prefetch setting (MiB of the next
GEMV's weights pulled into L2 beside each all-reduce, KILN_TP_PREFETCH_MB; `:lines` per-line prefetches instead of
bulk ones, KILN_TP_PREFETCH_LINES=1; `:early` the next GEMV waits for the prefetch kernel, KILN_TP_PREFETCH_LATE=0),
decode tok/s of TensorParallelModel.greedy (each rank feeds
its own argmax to its next step on the GPU), of the host loop (step, argmax read on the host, step), and each rank's
decode graph replayed back to back (GPU time alone, no host in the loop). Prints a table, writes JSON.

    python bench/tp_decode.py MODEL.gguf [--n 2] [--ctx 512] [--tokens 128] [--prefetch 16 0 8:lines] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import numpy as np

from kiln import gguf
from kiln.tp import TensorParallelModel


def greedy_tps(tp, ids: list[int], n: int) -> float:
    tp.reset()
    gen = tp.greedy(tp.prefill(ids))
    next(gen)
    t0 = time.perf_counter()
    for _ in itertools.islice(gen, n):
        pass
    dt = time.perf_counter() - t0
    gen.close()
    return n / dt


def host_loop_tps(tp, ids: list[int], n: int) -> float:
    tp.reset()
    token = tp.dev.argmax(tp.prefill(ids))
    t0 = time.perf_counter()
    for _ in range(n):
        token = tp.dev.argmax(tp.step([token]))
    return n / (time.perf_counter() - t0)


def graph_step_s(tp, launches: int = 100) -> float:
    """Seconds per decode step with every rank replaying its captured decode graph back to back (the slowest rank)."""
    import cupy

    def replay(r: int) -> float:
        dev = tp.devices[r]
        (graph,) = [g for k, g in dev._graphs.items() if k in dev._plans]
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record(dev.stream)
        for _ in range(launches):
            graph.graph.launch(stream=dev.stream)
        b.record(dev.stream)
        b.synchronize()
        return cupy.cuda.get_elapsed_time(a, b) / 1e3 / launches

    return max(tp._all(replay))


def set_prefetch(tp, setting: str) -> None:
    """A new prefetch setting for every rank; the decode graphs are dropped, so the next step records them again."""
    mib, *flags = setting.split(":")

    def apply(r: int) -> None:
        dev = tp.devices[r]
        dev.sync()
        dev.prefetch_bytes = int(float(mib) * (1 << 20))
        dev.prefetch_lines, dev.prefetch_late = "lines" in flags, "early" not in flags
        for key in list(dev._plans):
            dev._graphs.pop(key, None)
        dev._plans.clear()

    tp._all(apply)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=2, help="ranks (GPUs)")
    ap.add_argument("--ctx", type=int, default=512, help="prompt tokens before decoding")
    ap.add_argument("--tokens", type=int, default=128, help="decode tokens per run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prefetch", nargs="+", default=["16", "0"], help="settings: MiB[:lines][:early]")
    ap.add_argument("--json")
    args = ap.parse_args()
    f = gguf.load(args.model)
    tp = TensorParallelModel(f, args.n, n_ctx=args.ctx + args.tokens + 64)
    ids = [int(i) for i in np.random.default_rng(0).integers(100, f.config.vocab_size, args.ctx)]
    rows = []
    try:
        for setting in args.prefetch:
            set_prefetch(tp, setting)
            greedy_tps(tp, ids, 8)  # records, fuses and captures the decode step at this setting
            g = [greedy_tps(tp, ids, args.tokens) for _ in range(args.reps)]
            h = [host_loop_tps(tp, ids, args.tokens) for _ in range(args.reps)]
            step = graph_step_s(tp)
            rows.append(
                {
                    "prefetch": setting,
                    "greedy_tps": statistics.median(g),
                    "greedy_runs": g,
                    "host_loop_tps": statistics.median(h),
                    "host_loop_runs": h,
                    "graph_step_us": step * 1e6,
                    "graph_tps": 1 / step,
                }
            )
            r = rows[-1]
            print(
                f"prefetch {setting:>12}: greedy {r['greedy_tps']:7.1f} tok/s, host loop {r['host_loop_tps']:7.1f}, "
                f"graphs alone {r['graph_step_us']:7.1f} us/step ({r['graph_tps']:.1f} tok/s)",
                flush=True,
            )
    finally:
        tp.close()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"model": args.model, "n": args.n, "ctx": args.ctx, "tokens": args.tokens, "rows": rows}, fh, indent=1
            )


if __name__ == "__main__":
    main()
