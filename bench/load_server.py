"""Load test for `kiln serve`: many concurrent streaming clients, every answer checked against a solo run.

Starts a server on a free loopback port (or targets --url, loopback only), asks each distinct prompt once alone
(greedy, so the answer is fixed), then runs --clients concurrent clients x --requests streamed requests each.
Fails (exit 1) if any request did not complete, got a 5xx, or streamed text that differs from its solo answer
(a stream that received another request's tokens) or chunks with a foreign id. Prints requests/s, tokens/s and
time-to-first-token percentiles and writes them as JSON (--out). The whole run is bounded by --time-limit.

    python bench/load_server.py --backend numpy --clients 64 --requests 2 --max-tokens 4 --out load.json
"""

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from urllib.parse import urlparse

import httpx

QUESTIONS = [
    "What is 2+2?",
    "Name a color.",
    "Say hello.",
    "What is the capital of France?",
    "Name a fruit.",
    "Count to three.",
    "What is water made of?",
    "Name a planet.",
]
PROMPTS = [
    "The capital of France is",
    "One, two, three,",
    "The sky is",
    "Water boils at",
    "My favourite fruit is",
    "The first planet from the sun is",
    "Once upon a time",
    "Python is a",
]
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def start_server(args) -> tuple[subprocess.Popen, str]:
    """`kiln serve --port 0` in a subprocess; the URL comes from the line it prints once listening."""
    cmd = [
        sys.executable,
        "-m",
        "kiln",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--ctx",
        str(args.ctx),
        "--max-concurrency",
        str(args.clients),
        "--log-level",
        "warning",
    ]
    cmd += ["--backend", args.backend] if args.backend else []
    cmd += ["--model", args.model] if args.model else []
    # every client's sequence in one step, and KV blocks for all of them at once
    cmd += ["--max-seqs", str(min(args.clients, 256)), "--kv-tokens", str(args.clients * args.ctx // 2)]
    cmd += ["--api-key", args.api_key] if args.api_key else []
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        m = re.search(r"on (http://[^\s]+)/v1", line)
        if m:
            return proc, m.group(1)
    proc.terminate()
    raise SystemExit("server did not start within 300 s")


def body(args, i: int) -> dict:
    common = {
        "model": "default",
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.endpoint == "chat":
        return {**common, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
    return {**common, "prompt": PROMPTS[i % len(PROMPTS)]}


async def one(client: httpx.AsyncClient, args, i: int) -> dict:
    """One streamed request; returns its text, timings, ids seen and status."""
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    t0 = time.perf_counter()
    rec = {
        "prompt": i % len(QUESTIONS if args.endpoint == "chat" else PROMPTS),
        "status": None,
        "ttft": None,
        "text": "",
        "ids": set(),
        "tokens": 0,
        "done": False,
    }
    async with client.stream("POST", path, json=body(args, i)) as r:
        rec["status"] = r.status_code
        if r.status_code != 200:
            rec["error"] = (await r.aread()).decode(errors="replace")[:300]
            return rec
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                rec["done"] = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                rec["error"] = event["error"]["message"]
                continue
            rec["ids"].add(event["id"])
            if event.get("usage"):
                rec["tokens"] = event["usage"]["completion_tokens"]
            for c in event["choices"]:
                piece = c["delta"].get("content") if args.endpoint == "chat" else c["text"]
                if piece and rec["ttft"] is None:
                    rec["ttft"] = time.perf_counter() - t0
                rec["text"] += piece or ""
    rec["latency"] = time.perf_counter() - t0
    return rec


async def run(args, url: str) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=args.time_limit) as client:
        n_prompts = len(QUESTIONS if args.endpoint == "chat" else PROMPTS)
        solo = {}
        for i in range(n_prompts):  # alone on the server: the answer each stream must get under load
            rec = await one(client, args, i)
            if rec["status"] != 200 or not rec["done"]:
                raise SystemExit(f"solo request {i} failed: {rec.get('error') or rec['status']}")
            solo[i] = rec["text"]

        async def worker(c: int) -> list[dict]:
            return [await one(client, args, c * args.requests + k) for k in range(args.requests)]

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(worker(c)) for c in range(args.clients)]
        done, pending = await asyncio.wait(tasks, timeout=args.time_limit)
        wall = time.perf_counter() - t0
        for t in pending:
            t.cancel()
        recs = [r for t in done if not t.exception() for r in t.result()]
        crashed = [repr(t.exception()) for t in done if t.exception()]
        metrics = (await client.get("/metrics")).text
    expected = args.clients * args.requests
    ok = [r for r in recs if r["status"] == 200 and r["done"] and "error" not in r]
    mixed = [r for r in ok if r["text"] != solo[r["prompt"]] or len(r["ids"]) != 1]
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    lat = sorted(r["latency"] for r in ok)
    tokens = sum(r["tokens"] for r in ok)

    def pct(xs: list[float], p: float) -> float | None:
        return round(xs[min(len(xs) - 1, int(p / 100 * len(xs)))], 3) if xs else None

    return {
        "url": url,
        "endpoint": args.endpoint,
        "clients": args.clients,
        "requests_per_client": args.requests,
        "max_tokens": args.max_tokens,
        "expected": expected,
        "completed": len(ok),
        "status_5xx": sum(1 for r in recs if r["status"] and r["status"] >= 500),
        "errors": [r.get("error") or r["status"] for r in recs if r not in ok][:10] + crashed[:10],
        "timed_out": len(pending),
        "mismatched_streams": len(mixed),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "latency_p50_s": pct(lat, 50),
        "latency_p99_s": pct(lat, 99),
        "server_metrics": {k: float(v) for k, v in re.findall(r"^(kiln_\w+) (\S+)$", metrics, re.M)},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="an already running kiln serve on loopback, e.g. http://127.0.0.1:8080")
    p.add_argument("--model", help="GGUF to serve (default: the embedded model)")
    p.add_argument("--backend", default="numpy", help="backend of the started server (default numpy)")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--api-key", default=None)
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients (max 256)")
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after another (max 20)")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--time-limit", type=float, default=600, help="seconds for the concurrent phase (max 1800)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    if not (1 <= args.clients <= 256 and 1 <= args.requests <= 20 and 0 < args.time_limit <= 1800):
        p.error("--clients 1..256, --requests 1..20, --time-limit up to 1800 s")
    proc = None
    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            p.error("--url must be a loopback address (127.0.0.1, localhost, ::1)")
        url = args.url.rstrip("/").removesuffix("/v1")
    else:
        proc, url = start_server(args)
    try:
        res = asyncio.run(run(args, url))
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)
    summary = {k: v for k, v in res.items() if k != "server_metrics"}
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    good = (
        res["completed"] == res["expected"]
        and not res["mismatched_streams"]
        and not res["status_5xx"]
        and not res["timed_out"]
    )
    print("PASS" if good else "FAIL", file=sys.stderr)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
