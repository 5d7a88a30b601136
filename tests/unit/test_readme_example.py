"""The README's user-kernel example runs as written and prints what it says (on any WebGPU adapter)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from kiln.errors import BackendUnavailable

README = Path(__file__).resolve().parents[2] / "README.md"


def test_user_kernel_example():
    pytest.importorskip("wgpu")
    text = README.read_text()
    code = re.search(r"## Your own kernels.*?```python\n(.*?)```", text, re.S).group(1)
    expected = re.search(r"print\(.*\)  # (.*)", code).group(1)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})
    except BackendUnavailable as e:
        pytest.skip(f"no WebGPU adapter: {e}")
    assert out.getvalue().strip() == expected
