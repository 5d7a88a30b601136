"""Every bad input gets one clear error line, a non-zero exit code and no traceback."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter

from kiln import synth
from kiln.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def assert_one_clear_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("kiln: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_file(capsys, tmp_path):
    assert_one_clear_error(*run_cli(capsys, "run", "hi", "--model", str(tmp_path / "nope.gguf")), "not found")


def test_not_a_gguf(capsys, tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("these are not weights\n" * 10)
    assert_one_clear_error(*run_cli(capsys, "run", "hi", "--model", str(path)), "not a GGUF")


def test_truncated_file(capsys, tiny_models, tmp_path):
    data = open(tiny_models(Q.Q8_0), "rb").read()
    for cut in (len(data) // 2, 100, len(data) - 1000):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        code, err = run_cli(capsys, "info", str(path))
        assert_one_clear_error(code, err)
        assert "truncated" in err or "corrupt" in err


def test_unsupported_architecture(capsys, tmp_path):
    path = synth.write_model(str(tmp_path / "mamba.gguf"), synth.SHAPES["tiny"], Q.Q8_0, arch="mamba")
    assert_one_clear_error(*run_cli(capsys, "run", "hi", "--model", path), "unsupported architecture 'mamba'")


def test_unsupported_tensor_type(capsys, tmp_path):
    path = str(tmp_path / "q2k.gguf")
    w = GGUFWriter(path, "llama")
    raw = np.random.default_rng(0).integers(0, 255, size=(4, 84), dtype=np.uint8)  # one Q2_K block per row
    w.add_tensor("token_embd.weight", raw, raw_shape=raw.shape, raw_dtype=Q.Q2_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_clear_error(*run_cli(capsys, "info", path), "Q2_K")


def test_shape_not_matching_metadata(capsys, tmp_path):
    path = synth.write_model(
        str(tmp_path / "bad.gguf"), synth.SHAPES["tiny"], Q.Q8_0, meta_overrides={"llama.feed_forward_length": 100}
    )
    assert_one_clear_error(*run_cli(capsys, "run", "hi", "--model", path), "ffn_gate", "(100, 256)")


def test_prompt_longer_than_context(capsys, tiny_models):
    code, err = run_cli(
        capsys, "run", "word " * 200, "--model", tiny_models(Q.Q8_0), "--ctx", "64", "-n", "4", "--backend", "numpy"
    )
    assert_one_clear_error(code, err, "context")


def test_bad_sampling_value(capsys, tiny_models):
    code, err = run_cli(capsys, "run", "hi", "--model", tiny_models(Q.Q8_0), "--top-p", "0", "--backend", "numpy")
    assert_one_clear_error(code, err, "top_p")


@pytest.mark.parametrize("argv", [["run", "hi", "--model", "/nonexistent/x.gguf"], ["info", "/etc/hostname"]])
def test_real_process_prints_no_traceback(argv):
    proc = subprocess.run([sys.executable, "-m", "kiln", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("kiln: error:")


def test_empty_prompt(capsys, tiny_models):
    code, err = run_cli(capsys, "run", "", "--model", tiny_models(Q.Q8_0), "--no-chat-template", "--backend", "numpy")
    assert_one_clear_error(code, err, "prompt is empty")
