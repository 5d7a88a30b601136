"""`kiln bench` end to end on the NumPy backend with a tiny random model: the table prints and the JSON has every
field the benchmark reports promise."""

from __future__ import annotations

import json

from gguf import GGMLQuantizationType as Q

from kiln import bench
from kiln.cli import main


def test_bench_cli_writes_json(tiny_models, tmp_path, capsys):
    path = tiny_models(Q.Q8_0)
    out = tmp_path / "res" / "bench.json"
    assert (
        main(["bench", "--model", path, "--backend", "numpy", "-p", "8", "-n", "4", "-r", "1", "--json", str(out)]) == 0
    )
    table = capsys.readouterr().out
    assert "pp8" in table and "tg4" in table
    res = json.loads(out.read_text())
    for key in (*bench.FIELDS, "file_bytes", "kiln_version", "decode_weight_bytes_per_token", "prefill_tok_s_sd"):
        assert key in res, key
    assert res["backend"] == "numpy" and res["weight_type"] == "Q8_0"
    assert res["prompt_tokens"] == 8 and res["generated_tokens"] == 4
    assert res["prefill_tok_s"] > 0 and res["decode_tok_s"] > 0
    assert res["decode_gb_s"] == res["decode_weight_bytes_per_token"] * res["decode_tok_s"] / 1e9
    assert 0 < res["decode_weight_bytes_per_token"] <= res["file_bytes"]
    assert res["peak_memory_bytes"] > 0


def test_bench_skips_a_test_given_zero_tokens(tiny_models):
    res = bench.run_bench(tiny_models(Q.Q4_0), "numpy", prompt_tokens=0, gen_tokens=3, repetitions=2)
    assert res["prefill_tok_s"] == 0 and res["decode_tok_s"] > 0 and len(res["decode_runs"]) == 2
    assert "tg3" in bench.format_table([res]) and "pp" not in bench.format_table([res])
