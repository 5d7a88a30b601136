"""Tiny random-config models of every weight format run end to end; the logits must match a plain float64 NumPy
forward written here from the gguf package's own dequantizer (independent of kiln's quant.py and model.py)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize
from helpers import nmse

from kiln import gguf, synth
from kiln.model import Model
from kiln.runtime.numpy_backend import NumpyDevice
from kiln.session import solo

TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def reference_logits(path: str, ids: list[int]) -> np.ndarray:
    """Textbook Llama forward in float64 over all positions; returns logits of every position."""
    r = GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    meta = {k: f.contents() for k, f in r.fields.items() if k.startswith(arch)}
    W = {
        t.name: dequantize(t.data, t.tensor_type).astype(np.float64).reshape([int(x) for x in reversed(t.shape)])
        for t in r.tensors
    }
    d, H = meta[f"{arch}.embedding_length"], meta[f"{arch}.attention.head_count"]
    Hkv, eps = meta[f"{arch}.attention.head_count_kv"], meta[f"{arch}.attention.layer_norm_rms_epsilon"]
    theta, hd, T = meta[f"{arch}.rope.freq_base"], d // H, len(ids)

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def rope(x, n):  # x [T, n*hd]
        x = x.reshape(T, n, hd).copy()
        ang = np.arange(T)[:, None] * theta ** (-np.arange(0, hd, 2) / hd)[None]
        c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
        if arch == "qwen2":
            a, b = x[..., : hd // 2].copy(), x[..., hd // 2 :].copy()
            x[..., : hd // 2], x[..., hd // 2 :] = a * c - b * s, a * s + b * c
        else:
            a, b = x[..., 0::2].copy(), x[..., 1::2].copy()
            x[..., 0::2], x[..., 1::2] = a * c - b * s, a * s + b * c
        return x

    x = W["token_embd.weight"][ids]
    for i in range(meta[f"{arch}.block_count"]):
        p = f"blk.{i}."
        h = norm(x, W[p + "attn_norm.weight"])
        q, k, v = (h @ W[p + f"attn_{n}.weight"].T + W.get(p + f"attn_{n}.bias", 0) for n in "qkv")
        q, k, v = rope(q, H), rope(k, Hkv), v.reshape(T, Hkv, hd)
        out = np.zeros((T, H, hd))
        for head in range(H):
            kh = head // (H // Hkv)
            s = q[:, head] @ k[:, kh].T / np.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
            p_ = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (p_ / p_.sum(-1, keepdims=True)) @ v[:, kh]
        x = x + out.reshape(T, d) @ W[p + "attn_output.weight"].T + W.get(p + "attn_output.bias", 0)
        h = norm(x, W[p + "ffn_norm.weight"])
        g, u = (h @ W[p + f"ffn_{n}.weight"].T + W.get(p + f"ffn_{n}.bias", 0) for n in ("gate", "up"))
        x = x + (g / (1 + np.exp(-g)) * u) @ W[p + "ffn_down.weight"].T + W.get(p + "ffn_down.bias", 0)
    return norm(x, W["output_norm.weight"]) @ W.get("output.weight", W["token_embd.weight"]).T


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_tiny_llama_matches_float64_reference(tiny_models, qtype):
    path = tiny_models(qtype)
    ids = [1, 504, 345, 314, 289, 28, 17, 42, 400, 7]
    ref = reference_logits(path, ids)
    model = Model(gguf.load(path), NumpyDevice(), n_ctx=64)
    # Prefill all but the last two tokens, then decode token by token: exercises the KV cache and both paths.
    got = [model.dev.download(solo(model).prefill(ids[:-2]))[0]]
    got += [model.dev.download(solo(model).step([t]))[0] for t in ids[-2:]]
    for row, pos in zip(got, (len(ids) - 3, len(ids) - 2, len(ids) - 1)):
        assert np.isfinite(row).all()
        assert nmse(row, ref[pos]) < 1e-9, f"{qtype.name} pos {pos}"


def test_tiny_qwen2_with_bias_and_neox_rope(tiny_models):
    path = tiny_models(Q.Q8_0, "qwen2")
    ids = [3, 14, 159, 265, 358, 97]
    ref = reference_logits(path, ids)
    model = Model(gguf.load(path), NumpyDevice(), n_ctx=32)
    assert model.cfg.qkv_bias and model.cfg.rope.neox
    assert nmse(model.dev.download(solo(model).prefill(ids))[0], ref[-1]) < 1e-9


ALL_BIASES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.mark.parametrize("biases", [ALL_BIASES, ("attn_output", "ffn_down")], ids=["all", "output-down"])
def test_tiny_llama_with_optional_biases(tmp_path, biases):
    """llama.cpp loads llama's projection and FFN biases when a file has them; kiln must add every one of them."""
    path = synth.write_model(str(tmp_path / "bias.gguf"), synth.SHAPES["tiny"], Q.Q8_0, seed=3, biases=biases)
    ids = [3, 14, 159, 265, 358, 97, 12]
    ref = reference_logits(path, ids)
    model = Model(gguf.load(path), NumpyDevice(), n_ctx=32)
    assert model.layers[0].bo is not None and model.layers[0].b_down is not None
    got = [model.dev.download(solo(model).prefill(ids[:-1]))[0], model.dev.download(solo(model).step(ids[-1:]))[0]]
    assert nmse(got[0], ref[-2]) < 1e-9 and nmse(got[1], ref[-1]) < 1e-9
    no_bias = Model(gguf.load(path), NumpyDevice(), n_ctx=32)
    for layer in no_bias.layers:  # the same model with its biases dropped must differ: ignoring them would show
        layer.bq = layer.bk = layer.bv = layer.bo = layer.b_gate = layer.b_up = layer.b_down = None
    assert nmse(no_bias.dev.download(solo(no_bias).prefill(ids))[0], ref[-1]) > 1e-3


def test_prefix_reuse_and_chunked_prefill_equal_one_shot(tiny_models):
    path = tiny_models(Q.Q4_K)
    ids = list(range(100, 140))  # 40 tokens: several prefill chunks
    one = Model(gguf.load(path), NumpyDevice(), n_ctx=64)
    want = one.dev.download(solo(one).prefill(ids))[0]
    chunked = Model(gguf.load(path), NumpyDevice(), n_ctx=64)
    got = chunked.dev.download(solo(chunked).prefill(ids, chunk=7))[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # A second prompt sharing a prefix reuses the cache and still gives the one-shot answer.
    solo(chunked).prefill(ids[:20] + [5, 6, 7])
    assert solo(chunked).tokens == ids[:20] + [5, 6, 7]
    np.testing.assert_allclose(chunked.dev.download(solo(chunked).prefill(ids))[0], want, rtol=1e-4, atol=1e-4)


def test_weights_over_the_cache_budget_are_dequantized_per_use(tiny_models):
    path = tiny_models(Q.Q4_0)
    ids = [10, 20, 30, 40]
    cached = Model(gguf.load(path), NumpyDevice(), n_ctx=16)
    lean = Model(gguf.load(path), NumpyDevice(cache_bytes=0), n_ctx=16)
    assert lean.dev.memory_stats()["weight_cache_bytes"] == 0
    np.testing.assert_allclose(
        lean.dev.download(solo(lean).prefill(ids)), cached.dev.download(solo(cached).prefill(ids)), rtol=1e-5, atol=1e-5
    )


def test_decoding_keeps_the_prompt_activations(tiny_models):
    """A decode step must not free the prompt shapes' activations (their recorded steps would go with them); a third
    prompt shape frees the oldest. Keys: (tokens, sequences, logits rows, table width)."""
    m = Model(gguf.load(tiny_models(Q.Q8_0)), NumpyDevice(), n_ctx=64)
    try:
        solo(m).prefill(list(range(1, 9)))
        solo(m).step([5])
        assert sorted(m._acts) == [(1, 1, 1, 4), (8, 1, 1, 4)]
        for n in (12, 13):
            solo(m).reset()
            solo(m).prefill(list(range(1, n)))
        assert sorted(m._acts) == [(1, 1, 1, 4), (11, 1, 1, 4), (12, 1, 1, 4)]
    finally:
        m.close()
