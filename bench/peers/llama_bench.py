"""Run llama.cpp's llama-bench (built by build_llama_cpp.sh) on GGUFs, with the GPU and flash attention, and write
its figures in kiln bench's JSON fields, so bench/compare.py can put them side by side.

    python bench/peers/llama_bench.py BIN MODEL.gguf [...] [-p 512 -n 128 -r 3] --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess


def run(binary: str, model: str, p: int, n: int, r: int) -> dict:
    cmd = [binary, "-m", model, "-p", str(p), "-n", str(n), "-r", str(r), "-ngl", "99", "-fa", "1", "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        return {"peer": "llama.cpp", "model": os.path.basename(model), "error": proc.stderr[-2000:]}
    rows = json.loads(proc.stdout)
    res = {"peer": "llama.cpp", "model": os.path.basename(model), "command": " ".join(cmd)}
    for row in rows:
        if row.get("n_prompt") and not row.get("n_gen"):
            res["prefill_tok_s"], res["prefill_tok_s_sd"] = row["avg_ts"], row["stddev_ts"]
            res["prompt_tokens"] = row["n_prompt"]
        elif row.get("n_gen") and not row.get("n_prompt"):
            res["decode_tok_s"], res["decode_tok_s_sd"] = row["avg_ts"], row["stddev_ts"]
            res["generated_tokens"] = row["n_gen"]
        res.update({k: row.get(k) for k in ("build_commit", "build_number", "gpu_info", "model_type", "flash_attn")})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary")
    ap.add_argument("models", nargs="+")
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    results = []
    for m in args.models:
        res = run(args.binary, m, args.p, args.n, args.r)
        print(json.dumps({k: v for k, v in res.items() if k != "command"}), flush=True)
        results.append(res)
    with open(args.json, "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
