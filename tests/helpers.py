"""Helpers shared by the test modules (pytest puts tests/ on sys.path through tests/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.errors import KilnError
from kiln.session import solo


def nmse(got, want) -> float:
    """Normalised mean squared error in float64; NaN/Inf in the output fails outright."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.isfinite(got).all(), "NaN/Inf in the output"
    return float(np.sum((got - want) ** 2) / max(np.sum(want**2), 1e-30))


def greedy(model, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """n greedy tokens from a fresh cache (argmax on the device), and the logits after the last one."""
    model = solo(model)
    model.reset()
    logits = model.prefill(ids)
    out = []
    for _ in range(n):
        out.append(model.dev.argmax(logits))
        logits = model.step([out[-1]])
    return out, model.dev.download(logits)[0]


def fresh_logits(model, ids: list[int]) -> np.ndarray:
    """The last token's logits of `ids` in a Session of its own (its own cache: nothing reused)."""
    from kiln.session import Session

    s = Session(model)
    try:
        return model.dev.download(s.prefill(ids))[0]
    finally:
        s.close()


def fresh_greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after `ids` in a Session of its own (Session.greedy: the argmax fed on the device)."""
    from kiln.session import Session

    s = Session(model)
    try:
        gen = s.greedy(s.prefill(ids))
        return [next(gen) for _ in range(n)]
    finally:
        s.close()


def cuda_device_or_skip():
    try:
        from kiln.runtime.cuda_backend import CudaDevice

        return CudaDevice()
    except (KilnError, ImportError) as e:
        pytest.skip(f"no CUDA device: {e}")


def wgpu_device_or_skip():
    """A WgpuDevice on the first adapter; the test skips where wgpu-py or a WebGPU adapter is missing."""
    wgpu_backend = pytest.importorskip("kiln.runtime.wgpu_backend", reason="wgpu-py is not installed")
    from kiln.errors import BackendUnavailable

    try:
        return wgpu_backend.WgpuDevice()
    except BackendUnavailable as e:
        pytest.skip(f"no WebGPU adapter: {e}")
