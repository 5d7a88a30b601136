"""RoPE scaling (kiln/rope.py): the reference rotation of every scaling against a literal port of ggml's CPU rope,
hand-computed values of llama.cpp's yarn and llama3 formulas, the GGUF keys read as llama.cpp reads them, every
refusal, and backends that drop the scaling failing the conformance cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from kiln import conformance
from kiln.errors import GGUFError, UnsupportedModel
from kiln.gguf import TensorInfo
from kiln.rope import Rope, llama3_freq_factors, yarn_corr_dims
from kiln.runtime.numpy_backend import NumpyDevice

# --- an independent reference: ggml-cpu's rope, line by line, in float64 ----------------------------------------


def ggml_attn_factor(rope: Rope) -> float:
    """llama_context's cparams.yarn_attn_factor: get_mscale(factor), cancelled by 1 + 0.1 ln(factor) for yarn,
    times rope.scaling.attn_factor."""
    attn = 1.0
    if rope.scaling == "yarn":
        attn = 1.0 if rope.factor <= 1.0 else 0.1 * math.log(rope.factor) + 1.0
        attn *= 1.0 / (1.0 + 0.1 * math.log(rope.factor))
    return attn * rope.attn_factor


def ggml_rope(x: np.ndarray, positions, n_heads: int, hd: int, rope: Rope) -> np.ndarray:
    """ggml_compute_forward_rope_f32 (ggml_rope_cache_init, rope_yarn, rope_yarn_ramp, rotate_pairs) in float64."""
    freq_scale = 1.0 / rope.factor if rope.scaling != "none" else 1.0
    ext_factor = 1.0 if rope.scaling == "yarn" else 0.0
    corr = [0.0, 0.0]
    if rope.scaling == "yarn":
        n_ctx_orig, base = rope.orig_ctx, rope.theta

        def corr_dim(n_rot):
            return hd * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

        corr = [max(0.0, math.floor(corr_dim(rope.beta_fast))), min(hd - 1.0, math.ceil(corr_dim(rope.beta_slow)))]
    theta_scale = rope.theta ** (-2.0 / hd)
    out = np.array(x, np.float64).reshape(len(positions), n_heads, hd)
    for t, p in enumerate(positions):
        theta, cache = float(p), []
        for i0 in range(0, hd, 2):
            ff = rope.freq_factors[i0 // 2] if rope.freq_factors else 1.0
            theta_extrap = theta / ff
            theta_interp = freq_scale * theta_extrap
            th, mscale = theta_interp, ggml_attn_factor(rope)
            if ext_factor != 0.0:
                y = (i0 // 2 - corr[0]) / max(0.001, corr[1] - corr[0])
                ramp_mix = (1 - min(1.0, max(0.0, y))) * ext_factor
                th = theta_interp * (1 - ramp_mix) + theta_extrap * ramp_mix
                mscale *= 1.0 + 0.1 * math.log(1.0 / freq_scale)
            cache.append((math.cos(th) * mscale, math.sin(th) * mscale))
            theta *= theta_scale
        for h in range(n_heads):
            row = out[t, h].copy()
            for i, (c, s) in enumerate(cache):
                a, b = (i, i + hd // 2) if rope.neox else (2 * i, 2 * i + 1)
                out[t, h, a] = row[a] * c - row[b] * s
                out[t, h, b] = row[a] * s + row[b] * c
    return out.reshape(len(positions), -1)


FF64 = llama3_freq_factors(5e5, 64)
ROPES = {
    "none": Rope(1e4, False),
    "linear": Rope(1e4, True, "linear", 4.0),
    "llama3": Rope(5e5, False, freq_factors=FF64),
    "yarn": Rope(1e6, True, "yarn", 4.0, orig_ctx=4096),
    "yarn-small-factor": Rope(1e4, False, "yarn", 0.5, orig_ctx=512),
    "llama3+yarn+attn": Rope(5e5, False, "yarn", 2.0, orig_ctx=2048, attn_factor=0.9, freq_factors=FF64),
    "linear+attn": Rope(1e4, False, "linear", 2.0, attn_factor=1.25),
}


@pytest.mark.parametrize("name", ROPES)
def test_reference_matches_ggml_formulas(name):
    rope, H, hd = ROPES[name], 3, 64
    positions = [0, 1, 17, 2187, 30000, 131071]
    x = np.random.default_rng(1).standard_normal((len(positions), H * hd)).astype(np.float32)
    dev = NumpyDevice()
    xt, pt = dev.upload(x), dev.upload(np.array(positions, np.int32))
    dev.rope(xt, pt, H, hd, rope)
    want = ggml_rope(x, positions, H, hd, rope)
    got = xt.numpy().astype(np.float64)
    # cos/sin rounded once to f32 (the reference) against float64 throughout: ~1e-7 relative per element
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_yarn_corr_dims_hand_computed():
    # Qwen2.5 (theta 1e6, head_dim 128, 32768 original tokens): 128 ln(32768 / (32 2pi)) / (2 ln 1e6) = 23.596 and
    # 128 ln(32768 / 2pi) / (2 ln 1e6) = 39.651
    assert yarn_corr_dims(128, 32768, 1e6, 32.0, 1.0) == (23.0, 40.0)
    assert yarn_corr_dims(64, 4096, 1e6, 32.0, 1.0) == (6.0, 16.0)  # 6.981 and 15.009
    assert yarn_corr_dims(64, 64, 1e4, 32.0, 1.0) == (0.0, 9.0)  # low -3.98 clamps to 0; high ceil(8.06)
    assert yarn_corr_dims(8, 10**9, 1e4, 32.0, 1.0) == (6.0, 7.0)  # low floor(6.70); high ceil(8.20) clamps to 7


def test_yarn_ramp_and_mscale_hand_computed():
    rope = Rope(1e6, False, "yarn", 4.0, orig_ctx=32768)
    base = 1e6 ** (-np.arange(64) / 64)
    inv = rope.inv_freq(128)
    np.testing.assert_allclose(inv[:24], base[:24], rtol=1e-15)  # up to low = 23: extrapolated (unchanged)
    np.testing.assert_allclose(inv[40:], base[40:] / 4, rtol=1e-15)  # from high = 40: interpolated (x 1/4)
    # pair 30: y = (30 - 23) / 17 = 0.41176, ramp 0.58824, so base * (0.41176 / 4 + 0.58824) = base * 0.69118
    assert inv[30] / base[30] == pytest.approx(0.6911764705882353, rel=1e-12)
    assert rope.mscale == pytest.approx(1.1386294361119891, rel=1e-15)  # 1 + 0.1 ln 4
    assert Rope(1e6, False, "yarn", 0.5, orig_ctx=64).mscale == 1.0  # get_mscale(factor <= 1) = 1
    assert Rope(1e6, False, "yarn", 4.0, orig_ctx=64, attn_factor=0.5).mscale == pytest.approx(0.5693147180559945)
    assert Rope(1e4, False, "linear", 4.0).mscale == 1.0


def test_llamacpp_float32_mscale_chain_nets_get_mscale():
    """llama.cpp divides get_mscale by 1 + 0.1 logf(factor) and ggml's rope_yarn multiplies 1 + 0.1 logf(1 /
    freq_scale) back, in float32: kiln's float64 mscale equals that product to f32 precision."""
    f32 = np.float32
    for factor in (1.5, 4.0, 8.0, 32.0):
        attn = f32(0.1) * f32(math.log(f32(factor))) + f32(1)
        attn = attn * (f32(1) / (f32(1) + f32(0.1) * f32(math.log(f32(factor)))))
        freq_scale = f32(1) / f32(factor)
        net = attn * (f32(1) + f32(0.1) * f32(math.log(f32(1) / freq_scale)))
        assert Rope(1e4, False, "yarn", factor, orig_ctx=64).mscale == pytest.approx(float(net), rel=3e-7)


def test_llama3_freq_factors_hand_computed():
    """Llama 3.1 8B's rope_freqs (theta 5e5, head_dim 128, factor 8, low 1, high 4, 8192 tokens): wavelengths
    2 pi 5e5^(i/64) below 2048 keep 1 (pairs 0..28), above 8192 get 8 (35..63), pair 32 (4442.9) blends to
    1 / ((1 - s) / 8 + s) with s = (8192 / 4442.9 - 1) / 3 = 0.28128: 2.69453."""
    ff = llama3_freq_factors(5e5, 128)
    assert len(ff) == 64 and ff[:29] == (1.0,) * 29 and ff[35:] == (8.0,) * 29
    assert ff[32] == pytest.approx(2.6945296878947333, rel=1e-6)
    assert all(1 < a < b < 8 for a, b in zip(ff[29:34], ff[30:35]))
    rope = Rope(5e5, False, freq_factors=ff)
    np.testing.assert_allclose(rope.inv_freq(128), 5e5 ** (-np.arange(64) / 64) / np.array(ff), rtol=1e-15)


def test_rope_is_hashable_and_kinds():
    assert hash(ROPES["llama3"]) == hash(Rope(5e5, False, freq_factors=FF64))
    assert {n: r.kind for n, r in ROPES.items() if n in ("none", "llama3", "yarn")} == {
        "none": "none",
        "llama3": "llama3",
        "yarn": "yarn",
    }
    assert ROPES["llama3+yarn+attn"].kind == "llama3+yarn"
    assert "yarn scaling, factor 4 from 4096 tokens" in ROPES["yarn"].describe()
    with pytest.raises(ValueError, match="freq factors for head_dim 128"):
        ROPES["llama3"].inv_freq(128)


# --- GGUF metadata, as llama.cpp reads it --------------------------------------------------------------------------


def freqs_tensor(values, qtype=Q.F32, n=None) -> dict[str, TensorInfo]:
    arr = np.asarray(values, np.float32 if qtype == Q.F32 else np.float16)
    return {"rope_freqs.weight": TensorInfo("rope_freqs.weight", qtype, (n or arr.size,), arr.view(np.uint8))}


def read(meta: dict, tensors=None, arch="llama", hd=64) -> Rope:
    base = {f"{arch}.context_length": 8192, f"{arch}.rope.freq_base": 5e5}
    return Rope.from_metadata(base | {f"{arch}.{k}": v for k, v in meta.items()}, tensors or {}, arch, hd)


def test_metadata_plain_and_linear():
    assert read({}) == Rope(5e5, False)
    assert read({}, arch="qwen2") == Rope(5e5, True)
    assert read({"rope.scaling.factor": 4.0}) == Rope(5e5, False, "linear", 4.0)  # no type: llama.cpp's "linear"
    assert read({"rope.scale_linear": 2.0}) == Rope(5e5, False, "linear", 2.0)  # the old key
    assert read({"rope.scaling.type": "linear", "rope.scaling.factor": 0.0}) == Rope(5e5, False)  # 0: unset
    assert read({"rope.scaling.type": "none", "rope.scaling.factor": 8.0}) == Rope(5e5, False)  # none never scales
    assert read({"rope.scaling.attn_factor": 0.5}).mscale == 0.5


def test_metadata_yarn():
    meta = {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0}
    assert read(meta | {"rope.scaling.original_context_length": 32768}) == Rope(5e5, False, "yarn", 4.0, orig_ctx=32768)
    assert read(meta).orig_ctx == 8192  # default: the training context (n_ctx_train)
    defaults = {"rope.scaling.yarn_beta_fast": 32.0, "rope.scaling.yarn_beta_slow": 1.0}
    assert read(meta | defaults | {"rope.scaling.yarn_attn_factor": 1 + 0.1 * math.log(4)}).scaling == "yarn"
    with pytest.raises(UnsupportedModel, match=r"llama\.rope\.scaling\.yarn_beta_fast = 16.0 is not supported"):
        read(meta | {"rope.scaling.yarn_beta_fast": 16.0})


def test_metadata_freq_factors():
    ff = llama3_freq_factors(5e5, 64)
    assert read({}, freqs_tensor(ff)) == Rope(5e5, False, freq_factors=ff)
    assert read({}, freqs_tensor(ff), arch="qwen2").freq_factors is None  # qwen2 does not read it (tensor check)


@pytest.mark.parametrize(
    "meta,tensors,error,match",
    [
        ({"rope.scaling.type": "longrope"}, None, UnsupportedModel, "'longrope'.* is not supported"),
        ({"rope.scaling.type": "su"}, None, UnsupportedModel, "unknown llama.rope.scaling.type = 'su'"),
        ({"rope.scaling.factor": -2.0}, None, GGUFError, "factor = -2: a rope scaling factor must be positive"),
        ({"rope.scaling.factor": float("nan")}, None, GGUFError, "factor = nan is not finite"),
        ({"rope.scaling.factor": "4"}, None, GGUFError, "factor = '4' is not a number"),
        ({"rope.freq_base": 0.0}, None, GGUFError, "freq_base = 0; expected a rope base > 1"),
        ({"rope.scaling.attn_factor": 0.0}, None, GGUFError, "attn_factor = 0; expected > 0"),
        ({"rope.dimension_count": 32}, None, UnsupportedModel, "dimension_count = 32 .partial rotary"),
        ({}, freqs_tensor(np.ones(31)), GGUFError, r"is F32 \(31,\); expected F32 \(32,\)"),
        ({}, freqs_tensor(np.ones(32), Q.F16), GGUFError, r"is F16 \(32,\); expected F32"),
        ({}, freqs_tensor([1.0] * 31 + [0.0]), GGUFError, "holds 0.0 at 31; factors must be finite and > 0"),
        ({}, freqs_tensor([np.nan] + [1.0] * 31), GGUFError, "holds nan at 0"),
    ],
)
def test_metadata_refusals(meta, tensors, error, match):
    with pytest.raises(error, match=match):
        read(meta, tensors)


# --- conformance: a backend that drops the scaling fails ------------------------------------------------------------


class DropsScaling(NumpyDevice):
    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def rope(self, x, pos, n_heads, head_dim, rope):
        if self.what == "all":
            super().rope(x, pos, n_heads, head_dim, Rope(rope.theta, rope.neox))
        else:  # rotates with the right angles but leaves cos/sin unscaled
            super().rope(x, pos, n_heads, head_dim, rope)
            x.storage[...] /= np.float32(rope.mscale)


@pytest.mark.parametrize("what,failing", [("all", {"llama3", "linear", "yarn", "llama3+yarn"}), ("mscale", {"yarn"})])
def test_backend_dropping_scaling_fails_the_scaled_cases(what, failing):
    results = conformance.run_suite(DropsScaling(what), ops=["rope"], quick=True)
    kinds = {r.case: c.params["rope"] for r, c in zip(results, conformance.cases(quick=True, ops=["rope"]))}
    for r in results:
        rope = kinds[r.case]
        wrong = rope.kind in failing or (what == "mscale" and rope.mscale != 1.0)
        assert r.status == ("fail" if wrong else "pass"), f"{r.case}: {r.status} {r.message}"
    assert sum(r.status == "fail" for r in results) >= 8
