"""One table of kiln against its peers on the same machine: tok/s and the kiln/peer ratio per model and test.

    python bench/compare.py KILN.json [...] --peers LLAMA.json [...] [--out bench/results/NAME.json]

KILN.json: files written by `kiln bench --json` (or a combined file this script wrote). Peer files: lists written by
bench/peers/*.py. Rows are matched by model file name (transformers rows by model shape).
"""

from __future__ import annotations

import argparse
import json


def _load(paths: list[str], key: str) -> list[dict]:
    out = []
    for p in paths:
        with open(p) as fh:
            data = json.load(fh)
        if isinstance(data, dict) and key in data:  # a combined file this script wrote
            out += data[key]
        else:
            out += data if isinstance(data, list) else [data]
    return out


def _shape(model: str) -> str:
    return model.rsplit("-", 1)[0].split(" ")[0]


def table(kiln: list[dict], peers: list[dict]) -> str:
    lines = [
        f"{'model':<26} {'test':<6} {'kiln tok/s':>11} {'GB/s':>6}  "
        + "  ".join(f"{name + ' tok/s':>18} {'ratio':>6}" for name in ("llama.cpp", "transformers"))
    ]
    for r in kiln:
        for test, key, n in (
            ("pp", "prefill_tok_s", r.get("prompt_tokens")),
            ("tg", "decode_tok_s", r.get("generated_tokens")),
        ):
            if not n:
                continue
            gbs = f"{r.get('decode_gb_s', 0):.0f}" if test == "tg" else "-"
            cells = [f"{r['model'].removesuffix('.gguf'):<26} {test + str(n):<6} {r[key]:>11.1f} {gbs:>6}"]
            for name in ("llama.cpp", "transformers"):
                match = [
                    p
                    for p in peers
                    if p.get("peer") == name
                    and key in p
                    and (
                        p["model"] == r["model"]
                        or (
                            name == "transformers"
                            and p["model"].split(" ")[0] == _shape(r["model"].removesuffix(".gguf"))
                        )
                    )
                ]
                if match:
                    v = match[0][key]
                    cells.append(f"{v:>18.1f} {r[key] / v:>5.2f}x")
                else:
                    cells.append(f"{'-':>18} {'':>6}")
            lines.append("  ".join(cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kiln", nargs="+")
    ap.add_argument("--peers", nargs="*", default=[])
    ap.add_argument("--extra", nargs="*", default=[], help="other JSON files to embed (e.g. bench/gemv.py output)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    kiln, peers = _load(args.kiln, "kiln"), _load(args.peers, "peers")
    print(table(kiln, peers))
    if args.out:
        extra = {}
        for p in args.extra:
            with open(p) as fh:
                extra[p.rsplit("/", 1)[-1].removesuffix(".json")] = json.load(fh)
        with open(args.out, "w") as fh:
            json.dump(
                {"device": kiln[0]["device"] if kiln else None, "kiln": kiln, "peers": peers, **extra}, fh, indent=1
            )


if __name__ == "__main__":
    main()
