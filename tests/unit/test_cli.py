"""The CLI's happy paths: info, devices, run (with and without the chat template), python -m kiln."""

from __future__ import annotations

import subprocess
import sys

from gguf import GGMLQuantizationType as Q

from kiln.cli import main


def test_info_on_the_embedded_model(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in (
        "architecture     llama",
        "layers           30",
        "9 query, 3 kv, head dim 64",
        "Q4_1 x210",
        "gpt2 (pre: smollm)",
        "<|im_start|>",
    ):
        assert needle in out


def test_devices_lists_numpy(capsys):
    assert main(["devices"]) == 0
    assert "numpy" in capsys.readouterr().out


def test_run_streams_and_reports_timings(capsys, tiny_models):
    path = tiny_models(Q.Q8_0)
    assert main(["run", "hello", "--model", path, "--backend", "numpy", "-n", "6", "-v"]) == 0
    err = capsys.readouterr().err
    assert "[loaded" in err and "tok/s" in err
    assert (
        main(
            [
                "run",
                "hello",
                "--model",
                path,
                "--backend",
                "numpy",
                "-n",
                "6",
                "--no-chat-template",
                "--temperature",
                "0.7",
                "--top-k",
                "20",
                "--top-p",
                "0.9",
                "--min-p",
                "0.05",
                "--repeat-penalty",
                "1.1",
                "--seed",
                "3",
            ]
        )
        == 0
    )


def test_python_dash_m_kiln_answers_on_the_embedded_model():
    proc = subprocess.run(
        [sys.executable, "-m", "kiln", "run", "What is the capital of France?", "-b", "numpy", "-n", "12"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
