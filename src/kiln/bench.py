"""`kiln bench`: prefill and decode speed of a GGUF on one backend, measured like llama.cpp's llama-bench.

pp: prefill of P random prompt tokens into an empty cache (tok/s = P / time until the logits are ready).
tg: greedy decoding of N tokens from an empty cache, one step per token, as generation runs it (Model.greedy: the
argmax is taken on the device and fed to the next step there; tok/s = N / time until the N-th token is on the
host). Each is repeated R times after a warm-up run (which compiles kernels and captures CUDA graphs); the table
shows mean ± standard deviation. Decode is memory-bound, so the table also shows the bandwidth it achieves: the bytes
of weights one token reads (every matrix once; the embedding table only when it is also the output head) times
tokens per second.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter

import numpy as np

from . import __version__, api, gguf
from .errors import KilnError
from .session import solo

FIELDS = (
    "model",
    "weight_type",
    "backend",
    "device",
    "prompt_tokens",
    "prefill_tok_s",
    "generated_tokens",
    "decode_tok_s",
    "decode_gb_s",
    "peak_memory_bytes",
)


def decode_weight_bytes(f: gguf.GGUFFile) -> int:
    """Bytes of weights one decode step reads: all matrices and norms; token_embd only if it is the output head."""
    tied = f.config.tied_embeddings
    return sum(t.nbytes for name, t in f.tensors.items() if name != "token_embd.weight" or tied)


def weight_type(f: gguf.GGUFFile) -> str:
    """The format holding most of the matrix bytes (what a file name's Q8_0 / Q4_K_M refers to)."""
    by_type: Counter = Counter()
    for name, t in f.tensors.items():
        if len(t.shape) == 2 and name != "token_embd.weight":
            by_type[t.qtype.name] += t.nbytes
    return by_type.most_common(1)[0][0] if by_type else "?"


def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    # Ids away from the specials at the start of every vocabulary; the model's speed does not depend on them.
    return np.random.default_rng(seed).integers(min(100, vocab - 1), vocab, n).tolist()


def _time_prefill(model, ids: list[int]) -> float:
    model = solo(model)
    model.reset()
    t0 = time.perf_counter()
    logits = model.prefill(ids)
    model.dev.argmax(logits)  # waits for the device
    return time.perf_counter() - t0


def _time_decode(model, first: int, n: int) -> float:
    """Seconds until n greedy tokens are on the host, as generation takes them (Session.greedy: a backend may run
    the next step while the host reads a token; the step it ran ahead is finished before the next timing)."""
    model = solo(model)
    model.reset()
    t0 = time.perf_counter()
    tokens = model.greedy(model.step([first]))
    for _ in range(n):
        next(tokens)
    elapsed = time.perf_counter() - t0
    tokens.close()
    model.dev.sync()  # the step run ahead finishes here, not in the next timing
    return elapsed


def _peak_bytes(stats: dict) -> int:
    """Weights + activations + KV cache at the peak. CUDA's peak_bytes counts everything; the pool-only peaks of
    the other backends leave out the weights, added here."""
    peak = int(stats.get("peak_bytes", 0))
    if "activation_bytes" in stats:
        return peak
    return peak + int(stats.get("weight_bytes", 0)) + int(stats.get("weight_cache_bytes", 0))


def _mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_bench(
    path: str | None,
    backend: str | None = None,
    device: int | None = None,
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    repetitions: int = 3,
    seed: int = 0,
    progress: bool = False,
    tensor_parallel: int = 1,
) -> dict:
    """Load the model once, warm up, then time prefill and decode `repetitions` times each. Returns the result.
    With tensor_parallel > 1, GB/s is the weights read by all GPUs together per second."""
    f = gguf.load(path or api.default_model_path())
    n_ctx = max(prompt_tokens, gen_tokens, 1) + 1
    model = api.load(
        f.path,
        backend=backend,
        device=device,
        n_ctx=n_ctx,
        progress=progress,
        quiet=True,
        tensor_parallel=tensor_parallel,
    )
    try:
        cfg, dev = model.cfg, model.dev
        ids = _prompt(cfg.vocab_size, max(prompt_tokens, 1), seed)
        if prompt_tokens:  # warm-up: compile, size the scratch buffers, capture graphs (a size seen twice)
            _time_prefill(model, ids)
            _time_prefill(model, ids)
        if gen_tokens:
            _time_decode(model, ids[0], min(gen_tokens, 4))
        prefill = [prompt_tokens / _time_prefill(model, ids) for _ in range(repetitions if prompt_tokens else 0)]
        decode = [gen_tokens / _time_decode(model, ids[0], gen_tokens) for _ in range(repetitions if gen_tokens else 0)]
        pp, pp_sd = _mean_sd(prefill)
        tg, tg_sd = _mean_sd(decode)
        per_token = decode_weight_bytes(f)
        stats = dev.memory_stats()
        return {
            "kiln_version": __version__,
            "model": os.path.basename(f.path),
            "model_name": cfg.name,
            "file_bytes": f.file_size,
            "weight_type": weight_type(f),
            "backend": dev.backend,
            "device": dev.name,
            "tensor_parallel": tensor_parallel,
            "prompt_tokens": prompt_tokens,
            "generated_tokens": gen_tokens,
            "repetitions": repetitions,
            "prefill_tok_s": pp,
            "prefill_tok_s_sd": pp_sd,
            "decode_tok_s": tg,
            "decode_tok_s_sd": tg_sd,
            "decode_weight_bytes_per_token": per_token,
            "decode_gb_s": per_token * tg / 1e9,
            "peak_memory_bytes": _peak_bytes(stats),
            "load_seconds": round(model.load_seconds, 3),
            "memory_stats": {k: v for k, v in stats.items() if isinstance(v, (int, float))},
            "prefill_runs": prefill,
            "decode_runs": decode,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    finally:
        model.close()
        dev.close()


def format_table(results: list[dict]) -> str:
    """A llama-bench-like table, one row per result."""
    head = ["model", "type", "size", "backend", "test", "tok/s", "GB/s", "peak mem"]
    rows = []
    for r in results:
        common = [r["model"], r["weight_type"], f"{r['file_bytes'] / 2**20:.0f} MiB", r["device"]]
        if r["prompt_tokens"]:
            rows.append(
                common
                + [
                    f"pp{r['prompt_tokens']}",
                    f"{r['prefill_tok_s']:.1f} ± {r['prefill_tok_s_sd']:.1f}",
                    "",
                    f"{r['peak_memory_bytes'] / 2**20:.0f} MiB",
                ]
            )
        if r["generated_tokens"]:
            rows.append(
                common
                + [
                    f"tg{r['generated_tokens']}",
                    f"{r['decode_tok_s']:.1f} ± {r['decode_tok_s_sd']:.1f}",
                    f"{r['decode_gb_s']:.1f}",
                    f"{r['peak_memory_bytes'] / 2**20:.0f} MiB",
                ]
            )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def cmd_bench(args) -> int:
    if args.batch:
        return _cmd_batch_bench(args)
    res = run_bench(
        args.model,
        args.backend,
        args.device,
        args.prompt_tokens,
        args.gen_tokens,
        args.repetitions,
        seed=args.seed,
        progress=sys.stderr.isatty(),
        tensor_parallel=args.tensor_parallel,
    )
    print(format_table([res]))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
        print(f"[wrote {args.json}]", file=sys.stderr)
    return 0


def _parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise KilnError(f"--batch takes batch sizes like 1,8,32,64, got {text!r}")
    return batches


def _cmd_batch_bench(args) -> int:
    from .bench_batch import format_rows, run_batch_bench

    batches = _parse_batches(args.batch)
    pp, tg = args.prompt_tokens, args.gen_tokens
    model = api.load(args.model, backend=args.backend, device=args.device, n_ctx=pp + tg + 1, quiet=True)
    try:
        rows = run_batch_bench(model, batches, pp, tg, seed=args.seed)
        f, dev = model.gguf, model.dev
        print(f"{os.path.basename(f.path)} ({weight_type(f)}) on {dev.name}")
        print(format_rows(rows))
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            info = {"kiln_version": __version__, "model": os.path.basename(f.path), "weight_type": weight_type(f)}
            with open(args.json, "w") as fh:
                json.dump({**info, "backend": dev.backend, "device": dev.name, "rows": rows}, fh, indent=1)
            print(f"[wrote {args.json}]", file=sys.stderr)
    finally:
        model.close()
        model.dev.close()
    return 0


def register_cli(sub) -> None:
    from .runtime import BACKENDS

    p = sub.add_parser(
        "bench",
        help="measure prefill and decode speed (tokens/s, GB/s) like llama-bench",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", "-m", help="path to a GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--backend", "-b", choices=(*BACKENDS, "auto"), default=None, help="compute backend")
    p.add_argument("--device", type=int, default=None, help="device index within the backend")
    p.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="split the model over N GPUs (cuda, NCCL); ranks on devices --device.. --device+N-1",
    )
    p.add_argument("-p", "--prompt-tokens", type=int, default=512, help="prompt tokens to prefill (0: skip)")
    p.add_argument("-n", "--gen-tokens", type=int, default=128, help="tokens to decode (0: skip)")
    p.add_argument("-r", "--repetitions", type=int, default=3, help="timed runs of each test")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    p.add_argument(
        "--batch",
        default=None,
        metavar="B,B,..",
        help="batched engine throughput for these batch sizes (llama-batched-bench's columns): "
        "B prompts of -p tokens prefilled together, then -n tokens decoded for each",
    )
    p.add_argument("--json", default=None, help="also write the result as JSON to this path")
    p.set_defaults(handler=cmd_bench)
