"""Model.greedy (tokens fed to the next step on the device, one step run ahead) against the plain loop of argmax and
step on every backend that runs here: same tokens, same cache bookkeeping, same end at a full context."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from helpers import cuda_device_or_skip, greedy, nmse, wgpu_device_or_skip

from kiln import gguf
from kiln.model import Model
from kiln.runtime.numpy_backend import NumpyDevice
from kiln.session import solo

PROMPT = [1, 504, 345, 314, 289]


@pytest.fixture(params=["numpy", "wgpu", "cuda"])
def device(request):
    if request.param == "numpy":
        dev = NumpyDevice()
    elif request.param == "cuda":
        pytest.importorskip("cupy")
        dev = cuda_device_or_skip()
    else:
        dev = wgpu_device_or_skip()
    yield dev
    dev.close()


@pytest.fixture
def model(tiny_models, device):
    m = Model(gguf.load(tiny_models(Q.Q8_0)), device, n_ctx=32)
    yield m
    m.close()


def test_greedy_tokens_equal_the_host_loop(model):
    want, _ = greedy(model, PROMPT, 12)  # the host loop: argmax on the host's request, then a step
    solo(model).reset()
    got = list(itertools.islice(solo(model).greedy(solo(model).prefill(PROMPT)), 12))
    assert got == want
    assert solo(model).tokens == PROMPT + got  # each token taken has been fed to a step


def test_cache_is_consistent_after_stopping_early(model, tiny_models, device):
    """When the caller stops, the step that read the last token taken is still running and its output is dropped:
    a later prompt that reuses the cached prefix must give the logits of a fresh model."""
    solo(model).reset()
    tokens = solo(model).greedy(solo(model).prefill(PROMPT))
    got = list(itertools.islice(tokens, 6))
    tokens.close()
    follow = PROMPT + got + [7, 9]  # reuses every cached row, the one the last step wrote included
    logits = model.dev.download(solo(model).prefill(follow))[0]
    fresh = Model(gguf.load(tiny_models(Q.Q8_0)), NumpyDevice(), n_ctx=32)
    want = fresh.dev.download(solo(fresh).prefill(follow))[0]
    fresh.close()
    assert nmse(logits, want) < 1e-6


def test_greedy_ends_when_the_context_is_full(model):
    """As the host loop in generate_step: the last token is yielded although no step can take it."""
    room = model.n_ctx - len(PROMPT)
    solo(model).reset()
    got = list(solo(model).greedy(solo(model).prefill(PROMPT)))
    assert len(got) == room + 1
    assert len(solo(model).tokens) == model.n_ctx
    assert got[:room] == greedy(model, PROMPT, room)[0]
    assert np.all(np.asarray(got) >= 0)


def test_wgpu_without_wgpu_native_paths(tiny_models, monkeypatch):
    """The wgpu backend reads tokens by submission index and re-encodes steps through wgpu-native's C functions when
    wgpu-py runs on wgpu-native; its fallbacks (wgpu-py's map_sync and methods) must give the same tokens."""
    from kiln.runtime import wgpu_backend

    dev = wgpu_device_or_skip()
    try:
        m = Model(gguf.load(tiny_models(Q.Q8_0)), dev, n_ctx=32)
        want = list(itertools.islice(solo(m).greedy(solo(m).prefill(PROMPT)), 8))
        monkeypatch.setattr(wgpu_backend, "_wgpu_native", None)  # _encode takes wgpu-py's methods
        monkeypatch.setattr(dev, "_indexed", None)  # read_token maps with wgpu-py's map_sync
        solo(m).reset()
        assert list(itertools.islice(solo(m).greedy(solo(m).prefill(PROMPT)), 8)) == want
        m.close()
    finally:
        dev.close()
