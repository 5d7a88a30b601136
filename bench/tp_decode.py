"""Where a tensor-parallel decode step's time goes, in one process: decode tok/s of TensorParallelModel.greedy
(each rank feeds its own argmax to its next step on its GPU), of the host loop (step, argmax read on the host,
step), and of each rank's decode graph replayed back to back (GPU time alone, no host in the loop). NCCL_* and
KILN_* settings in the environment are recorded with the figures. Prints one line, writes JSON.

    python bench/tp_decode.py MODEL.gguf [--n 2] [--ctx 512] [--tokens 128] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=2, help="ranks (GPUs)")
    ap.add_argument("--ctx", type=int, default=512, help="prompt tokens before decoding")
    ap.add_argument("--tokens", type=int, default=128, help="decode tokens per run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    f = gguf.load(args.model)
    tp = TensorParallelModel(f, args.n, n_ctx=args.ctx + args.tokens + 64)
    ids = [int(i) for i in np.random.default_rng(0).integers(100, f.config.vocab_size, args.ctx)]
    try:
        greedy_tps(tp, ids, 8)  # records, fuses and captures the decode step
        g = [greedy_tps(tp, ids, args.tokens) for _ in range(args.reps)]
        h = [host_loop_tps(tp, ids, args.tokens) for _ in range(args.reps)]
        step = graph_step_s(tp)
    finally:
        tp.close()
    env = {k: v for k, v in os.environ.items() if k.startswith(("KILN_", "NCCL_"))}
    row = {
        "model": args.model,
        "n": args.n,
        "ctx": args.ctx,
        "tokens": args.tokens,
        "env": env,
        "greedy_tps": statistics.median(g),
        "greedy_runs": g,
        "host_loop_tps": statistics.median(h),
        "host_loop_runs": h,
        "graph_step_us": step * 1e6,
        "graph_tps": 1 / step,
    }
    print(
        f"{env or ''} greedy {row['greedy_tps']:.1f} tok/s, host loop {row['host_loop_tps']:.1f}, "
        f"graphs alone {row['graph_step_us']:.1f} us/step ({row['graph_tps']:.1f} tok/s)"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(row, fh, indent=1)


if __name__ == "__main__":
    main()
