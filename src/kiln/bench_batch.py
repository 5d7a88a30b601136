"""`kiln bench --batch 1,8,32,64`: throughput of the batched engine, in llama-batched-bench's columns.

For each batch size B: B sequences of PP random prompt tokens are admitted at once and prefilled in one step
(T_PP, S_PP = B * PP / T_PP), then decoded greedily in lockstep for TG steps of B rows each (T_TG, S_TG =
B * TG / T_TG). The scheduler drives it exactly as it drives `kiln serve` (admission, block tables, per-row argmax
on the device), so its host work is in the figures. N_KV = B * (PP + TG) positions are in the KV cache at the end.
A warm-up pass of each B runs first (kernels compiled, CUDA graphs captured for the batch bucket).
"""

from __future__ import annotations

import time

import numpy as np

from .model import BLOCK_SIZE, Model
from .scheduler import Request, Scheduler

COLUMNS = ("PP", "TG", "B", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s", "T s", "S t/s")


def _prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(min(100, vocab - 1), vocab, length).tolist() for _ in range(n)]


def time_batch(model: Model, B: int, pp: int, tg: int, seed: int) -> dict:
    """One measurement of B sequences; a fresh cache each time, so no prompt hits the prefix cache."""
    cache = model.make_cache(B * (pp + tg + BLOCK_SIZE))
    try:
        sched = Scheduler(model, cache, max_seqs=B, token_budget=B * pp)
        reqs = [Request(p, tg) for p in _prompts(model.cfg.vocab_size, B, pp, seed)]
        for r in reqs:
            sched.add(r)
        t0 = time.perf_counter()
        sched.step()  # every prompt in one step; each sequence's first token comes out of it
        t1 = time.perf_counter()
        while sched.busy:
            sched.step()
        t2 = time.perf_counter()
        if any(len(r.output) != tg for r in reqs):
            raise RuntimeError("a sequence stopped early: the measurement would not be B x TG tokens")
    finally:
        cache.close()
    t_pp, t_tg = t1 - t0, t2 - t1
    return {
        "PP": pp,
        "TG": tg,
        "B": B,
        "N_KV": B * (pp + tg),
        "T_PP s": t_pp,
        "S_PP t/s": B * pp / t_pp,
        "T_TG s": t_tg,
        "S_TG t/s": B * (tg - 1) / max(t_tg, 1e-9),  # the first token came with the prefill
        "T s": t_pp + t_tg,
        "S t/s": B * (pp + tg) / (t_pp + t_tg),
    }


def run_batch_bench(model: Model, batches: list[int], pp: int, tg: int, seed: int = 0) -> list[dict]:
    if pp < 1 or tg < 2:
        raise ValueError("--batch needs -p >= 1 and -n >= 2")
    rows = []
    for B in batches:
        time_batch(model, B, pp, min(tg, 4), seed)  # warm-up: compile, capture this bucket's graphs
        rows.append(time_batch(model, B, pp, tg, seed + 1))
    return rows


def format_rows(rows: list[dict]) -> str:
    def cell(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) and v < 100 else f"{v:.2f}" if isinstance(v, float) else str(v)

    cells = [[cell(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(COLUMNS)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(c) for c in cells])
