"""`kiln selftest`: the table, the summary line, JSON output and exit codes, through cli.main()."""

from __future__ import annotations

import json

import pytest

from kiln import cli, selftest
from kiln.errors import BackendUnavailable
from kiln.runtime.numpy_backend import NumpyDevice


def test_numpy_add_passes(capsys):
    assert cli.main(["selftest", "--backend", "numpy", "--op", "add"]) == 0
    out = capsys.readouterr().out
    assert "device: numpy (CPU reference)" in out
    assert out.splitlines()[2].split()[:4] == ["op", "case", "dtype", "status"]
    row = next(line for line in out.splitlines() if "T=5 n=1001 in-place" in line)
    assert row.split()[0] == "add" and " pass " in row
    assert out.rstrip().endswith("3 passed, 0 failed, 0 skipped")


def test_skips_are_reported_and_json_written(tmp_path, capsys):
    path = tmp_path / "selftest.json"
    assert cli.main(["selftest", "-b", "numpy", "--op", "gather_rows", "basic", "--json", str(path)]) == 0
    assert "3 passed, 0 failed, 6 skipped" in capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["backend"] == "numpy" and data["summary"] == "3 passed, 0 failed, 6 skipped"
    basic = [r for r in data["results"] if r["op"] == "basic"]
    assert basic and all(r["status"] == "skip" and "user kernels" in r["message"] for r in basic)
    assert {"op", "case", "dtype", "status", "nmse", "threshold", "message", "seconds"} <= set(data["results"][0])


class _BadAdd(NumpyDevice):
    def add(self, a, b, out):
        super().add(a, b, out)
        out.storage.reshape(-1)[0] += 1.0


def test_a_failure_exits_nonzero(monkeypatch, capsys):
    monkeypatch.setattr(selftest, "get_device", lambda *a, **k: _BadAdd())
    assert cli.main(["selftest", "--op", "add"]) == 1
    out = capsys.readouterr().out
    assert out.count(" FAIL ") == 3 and "0 passed, 3 failed, 0 skipped" in out


def test_bad_arguments_and_unavailable_backend(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["selftest", "--op", "matmul_q"])
    assert e.value.code == 2

    def unavailable(name, index=None, quiet=False):
        raise BackendUnavailable(f"backend '{name}' is not installed")

    monkeypatch.setattr(selftest, "get_device", unavailable)
    assert cli.main(["selftest", "--backend", "cuda", "--op", "add"]) == 2
    assert "kiln: error: backend 'cuda' is not installed" in capsys.readouterr().err


def test_selftest_is_registered_with_its_handler():
    args = cli.build_parser().parse_args(["selftest", "--full", "--device", "1"])
    assert args.handler is selftest.run_selftest and args.full and args.device == 1 and args.backend is None
