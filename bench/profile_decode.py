"""Where a CUDA decode step's time goes: each kernel of the fused, captured step timed on its own (a graph of
repeats between events), against the whole graph on the GPU and the whole step seen from Python.

    python bench/profile_decode.py MODEL.gguf [--ctx 512]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
from gemv import graph_time  # bench/gemv.py, next to this script

from kiln import gguf
from kiln.model import Model
from kiln.runtime import get_device
from kiln.session import solo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--ctx", type=int, default=512, help="tokens in the cache when the step is profiled")
    args = ap.parse_args()
    dev = get_device("cuda")
    m = Model(gguf.load(args.model), dev, n_ctx=args.ctx + 64)
    ids = np.random.default_rng(0).integers(100, m.cfg.vocab_size, args.ctx).tolist()
    logits = solo(m).prefill(ids)
    for _ in range(3):
        logits = solo(m).step([dev.argmax(logits)])
    ((gkey, graph),) = [(k, g) for k, g in dev._graphs.items() if k[0] == (m.uid, "forward", 1)]
    plan = dev._plans[gkey]
    # whole step: GPU time of the graph, and wall time of step + argmax from Python
    with dev.stream:
        gpu = graph_time(dev, lambda i: dev._run(plan), 20, pdl=True)
    t0 = time.perf_counter()
    for _ in range(50):
        logits = solo(m).step([dev.argmax(logits)])
    wall = (time.perf_counter() - t0) / 50
    per_op = defaultdict(lambda: [0, 0.0])
    with dev.stream:
        for name, a in plan:
            t = graph_time(dev, lambda i, name=name, a=a: getattr(dev, "_do_" + name)(*a), 10, pdl=True)
            per_op[name][0] += 1
            per_op[name][1] += t
    total = sum(t for _, t in per_op.values())
    print(f"{args.model}: {len(plan)} kernels per token, context {args.ctx}")
    print(f"{'op':<14} {'count':>5} {'total us':>9} {'share':>6}")
    for name, (n, t) in sorted(per_op.items(), key=lambda kv: -kv[1][1]):
        print(f"{name:<14} {n:>5} {t * 1e6:>9.1f} {100 * t / total:>5.0f}%")
    print(
        f"sum of kernels alone {total * 1e6:.0f} us; whole graph on the GPU {gpu * 1e6:.0f} us; "
        f"step + argmax from Python {wall * 1e6:.0f} us ({1 / wall:.0f} tok/s)"
    )
    m.close()
    dev.close()


if __name__ == "__main__":
    main()
