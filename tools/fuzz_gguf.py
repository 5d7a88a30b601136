"""Fuzz kiln's GGUF loading: mutate a valid tiny model's bytes and metadata, load each result and run one forward.

Every file must end in one clear line (a KilnError) or load and give finite logits; anything else is a failure,
counted by kind: a traceback (any other exception), a timeout, a memory blow-up, or non-finite logits.

    python tools/fuzz_gguf.py -n 1000 --seed 0 --json fuzz.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import struct
import sys
import tempfile
import time
from collections import Counter

import numpy as np
from gguf import GGMLQuantizationType as Q

from kiln import synth
from kiln.api import load as api_load
from kiln.errors import KilnError
from kiln.generate import generate_step
from kiln.session import solo

TIME_LIMIT_S = 2.0
MEMORY_LIMIT_MB = 1024


def base_model(folder: str) -> bytes:
    path = synth.write_model(os.path.join(folder, "base.gguf"), synth.SHAPES["tiny"], Q.Q8_0, seed=1)
    return open(path, "rb").read()


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One of: flipped bytes, a field overwritten with a boundary value, a cut, an insertion -- in the header mostly."""
    b = bytearray(data)
    head = min(len(b), 40_000)
    kind = rng.integers(6)
    if kind == 0:  # flip a few bytes
        for _ in range(rng.integers(1, 8)):
            b[rng.integers(head)] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # a u64 field set to a boundary value
        at = int(rng.integers(4, head - 8))
        value = [0, 1, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1, 2**64 - 32][int(rng.integers(8))]
        b[at : at + 8] = struct.pack("<Q", value)
    elif kind == 2:  # a u32 field set to a boundary value (types, dims counts)
        at = int(rng.integers(4, head - 4))
        b[at : at + 4] = struct.pack("<I", int(rng.choice([0, 7, 9, 13, 31, 39, 255, 2**31, 2**32 - 1])))
    elif kind == 3:  # truncate
        b = b[: int(rng.integers(4, len(b)))]
    elif kind == 4:  # insert or delete a few bytes
        at = int(rng.integers(4, head))
        if rng.integers(2):
            b[at:at] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
        else:
            del b[at : at + int(rng.integers(1, 16))]
    else:  # corrupt tensor data: NaN scales or values
        at = int(rng.integers(head, len(b) - 2)) if len(b) > head + 2 else int(rng.integers(4, len(b) - 2))
        b[at : at + 2] = rng.choice([b"\x00\x7e", b"\x00\x7c", b"\xff\xff"])
    return bytes(b)


def check(path: str) -> str:
    """'error' (one clear KilnError), 'ran', or the failure kind."""
    t0 = time.perf_counter()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        model = api_load(path, backend="numpy", n_ctx=16)
        tokens = [t for t, _ in itertools.islice(generate_step(model, [1, 2, 3], want_logits=True), 2)]
        logits = model.dev.download(solo(model).step(tokens[-1:]))[0]
        model.close()
        outcome = "ran" if np.isfinite(logits).all() else "garbage"
    except KilnError as e:
        outcome = "error" if "\n" not in str(e) else "multi-line error"
    except Exception as e:  # the failure this fuzzer exists to find
        outcome = f"traceback {type(e).__name__}"
    if time.perf_counter() - t0 > TIME_LIMIT_S:
        outcome = "timeout"
    if (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024 > MEMORY_LIMIT_MB:
        outcome = "memory"
    return outcome


def run(n: int, seed: int) -> Counter:
    rng = np.random.default_rng(seed)
    counts: Counter = Counter()
    with tempfile.TemporaryDirectory() as folder:
        base = base_model(folder)
        path = os.path.join(folder, "m.gguf")
        for _ in range(n):
            with open(path, "wb") as f:
                f.write(mutate(base, rng))
            counts[check(path)] += 1
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    counts = run(args.n, args.seed)
    clean = counts["error"] + counts["ran"]
    print("| tried | clean | one-line error | loaded and ran | failures |\n|---|---|---|---|---|")
    failures = {k: v for k, v in counts.items() if k not in ("error", "ran")}
    print(f"| {args.n} | {clean} | {counts['error']} | {counts['ran']} | {failures or 'none'} |")
    print(f"{time.perf_counter() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tried": args.n, "seed": args.seed, "counts": dict(counts)}, f, indent=1)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
