"""Write the benchmark models: random-weight GGUFs of real shapes (kiln.synth), to a folder of your choice.

    python bench/make_models.py OUT_DIR [--only tinyllama-1.1b-q8_0 ...]

Random weights run at the speed of real ones (the same bytes are read), and llama.cpp loads them too. The tokenizer
is the embedded SmolLM2's when it is installed, else a byte-level one (speed does not depend on it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from gguf import GGMLQuantizationType as Q

from kiln import synth

# name -> (shape, matrix type, tied output head). Untied models get an output head of the matrix type.
MODELS = {
    "smollm2-135m-q4_1": ("smollm2-135m", Q.Q4_1, True),
    "smollm2-135m-q8_0": ("smollm2-135m", Q.Q8_0, True),
    "tinyllama-1.1b-q8_0": ("tinyllama-1.1b", Q.Q8_0, False),
    "tinyllama-1.1b-q4_0": ("tinyllama-1.1b", Q.Q4_0, False),
    "tinyllama-1.1b-q4_k": ("tinyllama-1.1b", Q.Q4_K, False),
    "llama-7b-q8_0": ("llama-7b", Q.Q8_0, False),
    "llama-7b-q4_0": ("llama-7b", Q.Q4_0, False),
}


def write(out_dir: str, name: str) -> str:
    shape, qtype, tied = MODELS[name]
    path = os.path.join(out_dir, f"{name}.gguf")
    if os.path.exists(path):
        return path
    embed = Q.Q8_0 if tied else qtype  # SmolLM2's GGUF keeps its tied embedding in Q8_0
    synth.write_model(
        path + ".part", synth.SHAPES[shape], qtype, embed_type=embed, tied=tied, progress=sys.stderr.isatty()
    )
    os.replace(path + ".part", path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--only", nargs="*", choices=sorted(MODELS), help="models to write (default: all)")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    for name in args.only or MODELS:
        t0 = time.perf_counter()
        path = write(args.out_dir, name)
        print(f"{path}  {os.path.getsize(path) / 2**20:.0f} MiB  {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
