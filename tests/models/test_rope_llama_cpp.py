"""RoPE scaling against llama.cpp as the oracle: random-weight llama3 (rope_freqs.weight), linear and yarn models at a
2,000-token prompt, kiln's NumPy logits at the last 8 positions (a prefill, then decode steps) against llama.cpp's
(CPU, f32 KV cache so only rounding separates the two). The same weights without the scaling disagree with llama.cpp,
so a loader or backend that dropped the scaling could not pass. Skipped where llama-cpp-python is not installed (CI
lacks it); the CI proof is tests/unit/test_rope.py's port of ggml's formulas and the conformance cases."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from helpers import nmse

from kiln import gguf, synth
from kiln.model import Model
from kiln.rope import llama3_freq_factors
from kiln.runtime.numpy_backend import NumpyDevice
from kiln.session import solo

PROMPT, LAST = 2000, 8
SHAPE = synth.Shape(2, 256, 4, 2, 512, vocab_size=2048, context_length=4096)  # vocab >= 1024: llama.cpp's tokenizer
AGREE_NMSE = 1e-6  # measured 3e-8 .. 2e-7 (f32 weights, f32 KV cache on both sides)
GGML_TYPE_F32 = 0
CASES = {
    "none": ("llama", SHAPE, {}),
    "llama3": (
        "llama",
        dataclasses.replace(SHAPE, rope_theta=5e5),
        dict(rope_freqs=llama3_freq_factors(5e5, 64, factor=8.0, orig_ctx=512)),
    ),
    "linear": ("llama", SHAPE, dict(rope_scaling={"type": "linear", "factor": 4.0})),
    "yarn": ("qwen2", SHAPE, dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_context_length": 512})),
    "yarn+attn_factor": (
        "llama",
        SHAPE,
        dict(rope_scaling={"type": "yarn", "factor": 8.0, "original_context_length": 512, "attn_factor": 0.8}),
    ),
}


# metadata llama.cpp reads in ways that are easy to get wrong: a factor without a type is linear, type none ignores
# the factor, yarn's original context defaults to the training context, freq factors compose with yarn and linear
VARIANTS = {
    "factor without type": ("llama", SHAPE, dict(rope_scaling={"factor": 4.0})),
    "none ignores factor": ("llama", SHAPE, dict(rope_scaling={"type": "none", "factor": 4.0})),
    "yarn without original context": ("qwen2", SHAPE, dict(rope_scaling={"type": "yarn", "factor": 4.0})),
    "yarn below 1": ("llama", SHAPE, dict(rope_scaling={"type": "yarn", "factor": 0.5, "original_context_length": 99})),
    "linear+attn_factor": ("qwen2", SHAPE, dict(rope_scaling={"type": "linear", "factor": 2.0, "attn_factor": 1.25})),
    "llama3+yarn": (
        "llama",
        dataclasses.replace(SHAPE, rope_theta=5e5),
        dict(
            rope_freqs=llama3_freq_factors(5e5, 64, factor=8.0, orig_ctx=512),
            rope_scaling={"type": "yarn", "factor": 4.0, "original_context_length": 512},
        ),
    ),
}


def prompt(n: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(1).integers(10, 2000, n)]


def kiln_last_logits(path: str, n: int = PROMPT) -> np.ndarray:
    """[LAST, vocab]: the prefill's last logits, then one decode step per remaining prompt token."""
    ids = prompt(n)
    model = Model(gguf.load(path), NumpyDevice(), n_ctx=n + 16)
    try:
        out = [model.dev.download(solo(model).prefill(ids[: n - LAST + 1]))[0]]
        out += [model.dev.download(solo(model).step([t]))[0] for t in ids[n - LAST + 1 :]]
        return np.array(out)
    finally:
        model.close()


def llama_cpp_last_logits(llama_cpp, path: str, n: int = PROMPT) -> np.ndarray:
    peer = llama_cpp.Llama(
        model_path=path,
        n_ctx=n + 16,
        logits_all=True,
        verbose=False,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
    )
    try:
        peer.eval(prompt(n))
        return np.array(peer.scores[n - LAST : n])
    finally:
        peer.close()


def write_pair(tmp_path, arch: str, shape: synth.Shape, scaling: dict) -> tuple[str, str]:
    """(the scaled model, the same weights unscaled); scale 0.2: sharp attention, so the rotation matters."""
    common = dict(arch=arch, seed=7, scale=0.2, embed_type=Q.F32)
    scaled = synth.write_model(str(tmp_path / "scaled.gguf"), shape, Q.F32, **common, **scaling)
    return scaled, synth.write_model(str(tmp_path / "plain.gguf"), shape, Q.F32, **common)


def agreement(got: np.ndarray, want: np.ndarray) -> tuple[float, float, int]:
    """(max NMSE, min NMSE, top-1 matches) over the last positions."""
    errors = [nmse(g, w) for g, w in zip(got, want)]
    return max(errors), min(errors), int(sum(g.argmax() == w.argmax() for g, w in zip(got, want)))


@pytest.mark.parametrize("name", CASES)
def test_scaled_logits_match_llama_cpp(tmp_path, name):
    llama_cpp = pytest.importorskip("llama_cpp")
    scaled, plain = write_pair(tmp_path, *CASES[name])
    assert gguf.load(scaled).config.rope.kind == name.split("+")[0]
    want = llama_cpp_last_logits(llama_cpp, scaled)
    worst, _, top1 = agreement(kiln_last_logits(scaled), want)
    report = f"{name}: kiln vs llama.cpp max NMSE {worst:.2e}, top-1 {top1}/{LAST}"
    if name != "none":
        _, closest, top1_plain = agreement(kiln_last_logits(plain), want)
        report += f"; unscaled kiln min NMSE {closest:.2e}, top-1 {top1_plain}/{LAST}"
        assert closest > 1e-2, report  # dropping the scaling is far off llama.cpp
    print(report)
    assert worst < AGREE_NMSE and top1 == LAST, report


@pytest.mark.parametrize("name", VARIANTS)
def test_metadata_variants_match_llama_cpp(tmp_path, name):
    llama_cpp = pytest.importorskip("llama_cpp")
    scaled, plain = write_pair(tmp_path, *VARIANTS[name])
    want = llama_cpp_last_logits(llama_cpp, scaled, 600)
    worst, _, top1 = agreement(kiln_last_logits(scaled, 600), want)
    assert worst < AGREE_NMSE and top1 == LAST, f"{name}: max NMSE {worst:.2e}, top-1 {top1}/{LAST}"
    scales = gguf.load(scaled).config.rope.kind != "none"
    assert (agreement(kiln_last_logits(plain, 600), want)[1] > 1e-2) == scales  # none: the plain file is the same
