"""`kiln selftest`: run the conformance suite on this machine's device and print a pass/fail/skip table.

The paths we cannot run ourselves (a Mac's Metal, an AMD or Intel GPU) get verified where they run: a user runs
this and sends the table.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import conformance
from .runtime import BACKENDS, get_device
from .runtime.base import MODEL_OPS


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "selftest",
        help="check every op of a backend against the NumPy reference (the conformance suite)",
        description="Run the conformance suite: each op on this device vs the NumPy reference (NMSE, NaN/Inf, "
        "out-of-bounds writes, leaks). Exits 1 if any case fails.",
    )
    p.add_argument(
        "--backend",
        "-b",
        choices=(*BACKENDS, "auto"),
        default=None,
        help="backend to check (default: $KILN_BACKEND or auto: cuda, then wgpu, then numpy)",
    )
    p.add_argument("--device", type=int, default=None, help="device index within the backend (see `kiln devices`)")
    p.add_argument(
        "--op",
        nargs="+",
        choices=(*MODEL_OPS, "basic"),
        default=None,
        metavar="OP",
        help=f"only these ops ({', '.join((*MODEL_OPS, 'basic'))}; default: all)",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="the full grid with large shapes (minutes on a slow device); default: the quick grid",
    )
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON to PATH")
    p.set_defaults(handler=run_selftest)


def run_selftest(args: argparse.Namespace) -> int:
    dev = get_device(args.backend, args.device, quiet=True)
    try:
        grid = "full" if args.full else "quick"
        print(f"device: {dev.name}\nbackend: {dev.backend}, KV cache {dev.kv_dtype}, {grid} grid", flush=True)
        progress = _progress(len(conformance.cases(quick=not args.full, ops=args.op)))
        results = conformance.run_suite(dev, ops=args.op, quick=not args.full, on_result=progress)
    finally:
        dev.close()
    print(conformance.format_table(results))
    line = conformance.summary(results)
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": dev.name,
                    "backend": dev.backend,
                    "kv_dtype": dev.kv_dtype,
                    "full": args.full,
                    "summary": line,
                    "results": [r.to_dict() for r in results],
                },
                f,
                indent=1,
            )
    return 1 if any(r.status == "fail" for r in results) else 0


def _progress(total: int):
    """A one-line counter on a terminal (a slow device can take minutes); nothing when output is redirected."""
    done = [0]

    def show(result: conformance.CaseResult) -> None:
        done[0] += 1
        if sys.stderr.isatty():
            end = "\n" if done[0] == total else ""
            sys.stderr.write(f"\r\x1b[K[{done[0]}/{total}] {result.op} {result.case}{end}")
            sys.stderr.flush()

    return show
