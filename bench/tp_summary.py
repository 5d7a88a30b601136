"""The tables of a bench/tp_device.sh run: kiln N=1/N=2 (and the diagnostics), llama.cpp N=1 / -sm layer / -sm row,
scaling, what the all-reduces cost, and the NCCL sweep. Reads every JSON under the phase folders of DIR.

    python bench/tp_summary.py /tmp/tp            # DIR/a, DIR/b as tp_device.sh leaves them
    python bench/tp_summary.py DIR --json OUT.json  # also one combined file (bench/results/h200x2-tp.json)
"""

from __future__ import annotations

import argparse
import glob
import json
import os

LAYERS = {"llama-7b": 32, "llama-70b": 80}


def _read(path: str):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def collect(root: str) -> dict:
    out: dict = {"kiln": {}, "llama_cpp": [], "allreduce_sweep": [], "phases": []}
    for phase_dir in sorted(glob.glob(os.path.join(root, "*"))):
        if not os.path.isdir(phase_dir):
            continue
        phase = os.path.basename(phase_dir)
        out["phases"].append(phase)
        for path in sorted(glob.glob(os.path.join(phase_dir, "*.json"))):
            name = os.path.basename(path)[: -len(".json")]
            data = _read(path)
            if data is None or name.endswith((".meta", ".rss")):
                continue
            if name.startswith("llama_"):
                out["llama_cpp"] += data
            elif name == "allreduce_sweep":
                out["allreduce_sweep"] = data
            elif isinstance(data, dict) and "decode_tok_s" in data:
                data = {k: v for k, v in data.items() if k not in ("prefill_runs",)}
                data["phase"] = phase
                data["meta"] = _read(os.path.join(phase_dir, name + ".meta.json")) or {}
                data["host_rss"] = _read(os.path.join(phase_dir, name + ".rss.json")) or {}
                out["kiln"][name] = data
    return out


def _shape(model: str) -> str:
    return model.rsplit("-", 1)[0]


def tables(d: dict) -> str:
    lines = []
    k = d["kiln"]
    if k:
        lines.append("kiln bench (-p 512 -n 128 -r 3; diag_* leave the all-reduces out: wrong outputs, timing only)")
        lines.append(
            f"{'run':<28} {'N':>2} {'prefill':>9} {'decode':>8} {'GB/s':>7} {'GB/s/GPU':>8} "
            f"{'rank peak GB':>12} {'host anon GB':>12} {'host file GB':>12}  build"
        )
        for name, r in k.items():
            n = r.get("tensor_parallel", 1)
            ms = r.get("memory_stats", {})
            rss = r.get("host_rss", {})
            anon, file = (rss.get(f"peak_rss_{k}_bytes") or 0 for k in ("anon", "file"))
            lines.append(
                f"{name:<28} {n:>2} {r['prefill_tok_s']:>9.0f} {r['decode_tok_s']:>8.1f} {r['decode_gb_s']:>7.0f} "
                f"{r['decode_gb_s'] / n:>8.0f} {ms.get('max_rank_peak_bytes', r['peak_memory_bytes']) / 1e9:>12.1f} "
                f"{anon / 1e9:>12.2f} {file / 1e9:>12.2f}"
                f"  {r['meta'].get('llama_cpp_build_running', '?')}"
            )
    if d["llama_cpp"]:
        lines += ["", "llama.cpp llama-bench (-ngl 99 -fa 1)"]
        lines.append(f"{'model':<22} {'mode':<8} {'gpus':>4} {'prefill':>9} {'decode':>8}")
        for r in d["llama_cpp"]:
            mode = r.get("split_mode_arg") or ("n1" if r.get("n_gpus") == 1 else r.get("split_mode", "?"))
            if "error" in r:
                lines.append(f"{r['model']:<22} {mode!s:<8} {r.get('n_gpus')!s:>4}  error: {r['error'][-200:]!r}")
                continue
            lines.append(
                f"{r['model']:<22} {mode!s:<8} {r.get('n_gpus')!s:>4} {r.get('prefill_tok_s', 0):>9.0f} "
                f"{r.get('decode_tok_s', 0):>8.1f}"
            )
    lines += ["", "scaling (N=2 / N=1, same phase)"]
    for phase_prefix in ("", "quiet_"):
        for size in ("7b", "70b"):
            one, two = k.get(f"{phase_prefix}tp1_{size}"), k.get(f"{phase_prefix}tp2_{size}")
            if one and two:
                dx = two["decode_tok_s"] / one["decode_tok_s"]
                px = two["prefill_tok_s"] / one["prefill_tok_s"] if one["prefill_tok_s"] else 0
                lines.append(
                    f"kiln {phase_prefix}{size}: decode {dx:.2f}x (efficiency {dx / 2:.0%}), prefill {px:.2f}x"
                )
            diag = k.get(f"diag_tp2_{size}_no_allreduce")
            if two and diag and not phase_prefix:
                layers = LAYERS.get(_shape(two["model"]), 0)
                t2, td = 1e6 / two["decode_tok_s"], 1e6 / diag["decode_tok_s"]
                per = (t2 - td) / (2 * layers) if layers else 0
                lines.append(
                    f"  all-reduces in the {size} decode step: {t2 - td:.0f} us of {t2:.0f} us per token "
                    f"({(t2 - td) / t2:.0%}); {per:.1f} us per all-reduce ({2 * layers} per token); "
                    f"without them N=2 would be {diag['decode_tok_s'] / one['decode_tok_s'] if one else 0:.2f}x N=1"
                )
    by = {}
    for r in d["llama_cpp"]:
        if "decode_tok_s" in r:
            mode = "n1" if r.get("n_gpus") == 1 else str(r.get("split_mode_arg") or r.get("split_mode"))
            by[(r["model"], mode)] = r
    for model in sorted({m for m, _ in by}):
        base = by.get((model, "n1"))
        for mode in ("layer", "row"):
            r = by.get((model, mode))
            if base and r:
                lines.append(
                    f"llama.cpp {model} -sm {mode}: decode {r['decode_tok_s'] / base['decode_tok_s']:.2f}x, "
                    f"prefill {r.get('prefill_tok_s', 0) / max(base.get('prefill_tok_s', 1), 1e-9):.2f}x"
                )
    if d["allreduce_sweep"]:
        lines += ["", "NCCL all-reduce in a CUDA graph, us per all-reduce (median of 20 graphs of 64), 2 GPUs"]
        for r in d["allreduce_sweep"]:
            sizes = r.get("sizes", {})
            row = "  ".join(
                f"{v['bytes'] // 1024:>5} KB {v['graph_us_per_allreduce']:>7.1f}{'' if v['sum_ok'] else ' WRONG'}"
                for v in sizes.values()
            )
            lines.append(f"{r['setting']:<16} {row or r.get('error', '')[-160:]!s}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root")
    ap.add_argument("--json")
    args = ap.parse_args()
    d = collect(args.root)
    print(tables(d))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(d, fh, indent=1)


if __name__ == "__main__":
    main()
