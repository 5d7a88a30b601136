"""Run llama.cpp's llama-bench (built by build_llama_cpp.sh) on GGUFs, with the GPU and flash attention, and write
its figures in kiln bench's JSON fields, so bench/compare.py can put them side by side.

    python bench/peers/llama_bench.py BIN MODEL.gguf [...] [-p 512 -n 128 -r 3] --json OUT.json
        [--gpus 0,1 --split-mode layer|row|none]

--gpus sets CUDA_VISIBLE_DEVICES for llama-bench (default: as inherited); --split-mode is llama-bench's -sm, how a
model is spread over the visible GPUs: layer (whole layers per GPU, the default there), row (every matrix split by
rows, results gathered on the main GPU) or, in llama.cpp builds that have it, tensor (a tensor-parallel meta device).
A run that fails is repeated once with -v and the tail of that log kept in the JSON (verbose_log_tail). NVLink
multicast stays off in llama-bench's environment (NCCL_NVLS_ENABLE=0).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess


def _json_array(text: str) -> list:
    """The JSON array in llama-bench's stdout; some split modes print ggml's device lines around and inside it
    (-sm tensor: between the test objects), which are dropped first."""
    text = re.sub(r"^(ggml_\w+:.*|  Device \d+:.*)\n?", "", text, flags=re.MULTILINE)
    match = re.search(r"^\[", text, re.MULTILINE)  # the array opens on a line of its own
    if match is None:
        raise ValueError("no JSON array")
    rows, _ = json.JSONDecoder().raw_decode(text[match.start() :])
    return rows


def run(
    binary: str,
    model: str,
    p: int,
    n: int,
    r: int,
    gpus: str | None = None,
    split_mode: str | None = None,
    timeout: float = 900,
) -> dict:
    cmd = [binary, "-m", model, "-p", str(p), "-n", str(n), "-r", str(r), "-ngl", "99", "-fa", "1", "-o", "json"]
    if split_mode:
        cmd += ["-sm", split_mode]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0"}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    n_gpus = len(gpus.split(",")) if gpus else None
    res = {
        "peer": "llama.cpp",
        "model": os.path.basename(model),
        "command": " ".join(cmd),
        "cuda_visible_devices": gpus,
        "n_gpus": n_gpus,
        "split_mode_arg": split_mode,  # as asked (None: llama-bench's default); split_mode below is as it reports
    }
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**res, "error": f"timed out after {timeout} s"}
    if proc.returncode:
        # llama-bench says only "failed to load model": once more with -v, for the loader's reason
        try:
            verbose = subprocess.run(cmd + ["-v"], capture_output=True, text=True, timeout=timeout, env=env)
            why = (verbose.stdout + verbose.stderr)[-6000:]
        except subprocess.TimeoutExpired:
            why = "(the -v rerun timed out)"
        return {**res, "error": proc.stderr[-2000:], "verbose_log_tail": why}
    try:
        rows = _json_array(proc.stdout)
    except ValueError:
        return {**res, "error": "no JSON from llama-bench: " + proc.stdout[-1000:] + proc.stderr[-1000:]}
    for row in rows:
        if row.get("n_prompt") and not row.get("n_gen"):
            res["prefill_tok_s"], res["prefill_tok_s_sd"] = row["avg_ts"], row["stddev_ts"]
            res["prompt_tokens"] = row["n_prompt"]
        elif row.get("n_gen") and not row.get("n_prompt"):
            res["decode_tok_s"], res["decode_tok_s_sd"] = row["avg_ts"], row["stddev_ts"]
            res["generated_tokens"] = row["n_gen"]
        keys = ("build_commit", "build_number", "gpu_info", "model_type", "model_size", "flash_attn", "split_mode")
        res.update({k: row.get(k) for k in keys if k in row})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary")
    ap.add_argument("models", nargs="+")
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--gpus", default=None, help="CUDA_VISIBLE_DEVICES for llama-bench, e.g. 0 or 0,1")
    ap.add_argument(
        "--split-mode", "-sm", default=None, choices=("none", "layer", "row", "tensor"), help="llama-bench -sm"
    )
    ap.add_argument("--timeout", type=float, default=900, help="seconds per model")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    results = []
    for m in args.models:
        res = run(args.binary, m, args.p, args.n, args.r, args.gpus, args.split_mode, args.timeout)
        print(json.dumps({k: v for k, v in res.items() if k != "command"}), flush=True)
        results.append(res)
        with open(args.json, "w") as fh:  # after every model: a later hang loses nothing written
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
