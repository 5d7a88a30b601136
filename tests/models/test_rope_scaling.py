"""RoPE scaling end to end on tiny random models written by synth: a Llama 3.1-style model (rope_freqs.weight) and a
Qwen2.5-style yarn model load with the scaling the file says, run on the GPU backends here (prefill: the plain
rope kernel; decode: the fused QKV GEMV) with logits matching NumPy's, and the scaling moves the logits at long
positions, so a backend or loader that dropped it could not pass."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from helpers import cuda_device_or_skip, nmse, wgpu_device_or_skip

from kiln import gguf, synth
from kiln.model import Model
from kiln.rope import Rope, llama3_freq_factors
from kiln.runtime.numpy_backend import NumpyDevice
from kiln.session import solo

SHAPE = synth.Shape(2, 256, 4, 2, 512, vocab_size=512, context_length=4096)  # head_dim 64
PROMPT = 300  # tokens: positions well past the models' original contexts (256)
DECODE = 3
LOGITS_NMSE = 1e-4  # as the embedded model's GPU-vs-NumPy checks
LLAMA3_FF = llama3_freq_factors(5e5, 64, factor=8.0, orig_ctx=256)  # pairs 10.. slowed 8x
MODELS = {
    "llama3": dict(
        arch="llama",
        shape=dataclasses.replace(SHAPE, rope_theta=5e5),
        kw=dict(rope_freqs=LLAMA3_FF),
        rope=Rope(5e5, False, freq_factors=LLAMA3_FF),
    ),
    "yarn": dict(
        arch="qwen2",
        shape=SHAPE,
        kw=dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_context_length": 256}),
        rope=Rope(1e4, True, "yarn", 4.0, orig_ctx=256),
    ),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> (scaled path, the same weights without the scaling)."""
    root = tmp_path_factory.mktemp("rope")
    out = {}
    for name, m in MODELS.items():
        common = dict(arch=m["arch"], seed=3, scale=0.2)
        scaled = synth.write_model(str(root / f"{name}.gguf"), m["shape"], Q.Q8_0, **common, **m["kw"])
        plain = synth.write_model(str(root / f"{name}-plain.gguf"), m["shape"], Q.Q8_0, **common)
        out[name] = (scaled, plain)
    return out


def prompt_ids() -> list[int]:
    return [int(t) for t in np.random.default_rng(0).integers(3, 259, PROMPT)]


def run(path: str, dev, forced: list[int] | None = None) -> tuple[list[np.ndarray], list[int]]:
    """Logits after the prompt and after each decode step, and the tokens fed: `forced`, or the greedy ones."""
    model = Model(gguf.load(path), dev, n_ctx=PROMPT + DECODE + 1)
    try:
        t = solo(model).prefill(prompt_ids())
        logits, tokens = [dev.download(t)[0]], []
        for i in range(DECODE):
            tokens.append(forced[i] if forced is not None else dev.argmax(t))
            t = solo(model).step([tokens[-1]])
            logits.append(dev.download(t)[0])
        return logits, tokens
    finally:
        model.close()


@pytest.fixture(scope="module")
def reference(files):
    """name -> (the scaled model's greedy tokens on NumPy, its logits, the plain model's along the same tokens)."""
    out = {}
    for name, (scaled, plain) in files.items():
        logits, tokens = run(scaled, NumpyDevice())
        out[name] = (tokens, logits, run(plain, NumpyDevice(), tokens)[0])
    return out


@pytest.mark.parametrize("name", MODELS)
def test_file_carries_the_scaling(files, name):
    assert gguf.load(files[name][0]).config.rope == MODELS[name]["rope"]
    assert gguf.load(files[name][1]).config.rope.kind == "none"


@pytest.mark.parametrize("name", MODELS)
def test_scaling_changes_logits_at_long_positions(reference, name):
    _, scaled, plain = reference[name]
    assert all(nmse(p, s) > 1e-2 for s, p in zip(scaled, plain)), [nmse(p, s) for s, p in zip(scaled, plain)]


@pytest.fixture(scope="module", params=["wgpu", "cuda"])
def gpu(request):
    dev = wgpu_device_or_skip() if request.param == "wgpu" else cuda_device_or_skip()
    yield dev
    dev.close()


@pytest.mark.parametrize("name", MODELS)
def test_gpu_logits_match_numpy(files, reference, gpu, name):
    forced, want, plain = reference[name]
    got, _ = run(files[name][0], gpu, forced)
    errors = [nmse(g, w) for g, w in zip(got, want)]
    assert max(errors) < LOGITS_NMSE, errors
    assert min(nmse(g, p) for g, p in zip(got, plain)) > 1e2 * max(errors)  # far from the unscaled answer
    plans = getattr(gpu, "plans", {})  # wgpu: the decode step ran fused (norm + QKV + RoPE in one GEMV)
    if gpu.backend == "wgpu":
        assert any("gemv_qkv" in plan for plan in plans.values()), plans
