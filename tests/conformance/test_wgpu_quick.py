"""Quick check of every wgpu op against the NumPy reference on small odd shapes (fast on lavapipe).

The shared conformance suite (tests/conformance/test_conformance.py) covers the full grid; this file pins down the
wgpu-specific paths: repacked and row-split weights, GEMV vs GEMM, flash-decode splits vs the prefill kernel,
in-place aliasing, views with sentinels, user kernels.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from helpers import nmse, wgpu_device_or_skip  # noqa: E402

from kiln import quant
from kiln.errors import UnsupportedOp
from kiln.rope import Rope
from kiln.runtime.base import DTYPES, KVIndex
from kiln.runtime.numpy_backend import NumpyDevice

wgpu_backend = pytest.importorskip("kiln.runtime.wgpu_backend", reason="wgpu-py is not installed")

EXACT = 1e-7  # NMSE; the reference gets the same quantized weights and f16 cache, so only rounding order differs

FORMATS = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.fixture(scope="module")
def dev():
    device = wgpu_device_or_skip()
    yield device
    device.close()


@pytest.fixture(scope="module")
def ref():
    return NumpyDevice()


def both(dev, ref, array: np.ndarray):
    return dev.upload(array), ref.upload(array)


def cols_for(qtype) -> int:
    return {Q.F32: 45, Q.F16: 45, Q.BF16: 46}.get(qtype, 256 if qtype.name.endswith("_K") else 96)


def weights(dev, ref, qtype, rows, cols, rng, name="w"):
    raw = quant.random_weight(qtype, rows, cols, rng, scale=0.5)
    return dev.load_weight(name, qtype, raw, (rows, cols)), ref.load_weight(name, qtype, raw, (rows, cols))


@pytest.fixture
def matmul_path(dev):
    """Set the GEMV shape / reduction / GEMM choice for one test, whatever this adapter would pick; restore after."""
    saved = dev.gemv_tpr, dev.gemv_rpw, dev.force_gemm, dev.use_subgroups

    def use(tpr: int, rpw: int, gemm: bool, subgroups: bool = True) -> None:
        dev.gemv_tpr, dev.gemv_rpw, dev.force_gemm = tpr, rpw, gemm
        dev.use_subgroups = subgroups and dev.has_subgroups

    yield use
    dev.gemv_tpr, dev.gemv_rpw, dev.force_gemm, dev.use_subgroups = saved


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_matmul_gemv_and_gemm(dev, ref, qtype, matmul_path):
    """GEMV shapes (CPU adapters: 8 threads x 8 rows, and 8 x 32; GPUs' 32 or 64 threads x 2 or 4 rows; 64 is
    wider than any lavapipe subgroup), both row reductions (subgroup, workgroup memory) and the tiled GEMM, on any
    adapter."""
    rng = np.random.default_rng(int(qtype))
    K, N = cols_for(qtype), 37
    w, w_ref = weights(dev, ref, qtype, N, K, rng)
    cases = [
        (1, 8, 8, False, True),
        (1, 8, 8, False, False),
        (1, 8, 32, False, True),
        (1, 32, 4, False, True),
        (1, 64, 4, False, True),
        (1, 32, 2, False, True),
        (1, 64, 2, False, False),
        (35, 8, 8, False, True),
        (35, 64, 4, True, True),
    ]
    for T, tpr, rpw, gemm, subgroups in cases:
        matmul_path(tpr, rpw, gemm, subgroups)
        x = rng.standard_normal((T, K), dtype=np.float32)
        out, out_ref = dev.empty((T, N)), ref.empty((T, N))
        dev.matmul(dev.upload(x), w, out)
        ref.matmul(ref.upload(x), w_ref, out_ref)
        assert nmse(out.numpy(), out_ref.numpy()) < EXACT, f"{qtype.name} T={T} gemm={gemm} {tpr}x{rpw} sg={subgroups}"


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_embed(dev, ref, qtype):
    rng = np.random.default_rng(100 + int(qtype))
    K, rows = cols_for(qtype), 29
    w, w_ref = weights(dev, ref, qtype, rows, K, rng)
    ids = np.array([3, 0, 28, 3, 17], np.int32)
    out, out_ref = dev.empty((5, K)), ref.empty((5, K))
    dev.embed(w, dev.upload(ids), out)
    ref.embed(w_ref, ref.upload(ids), out_ref)
    assert nmse(out.numpy(), out_ref.numpy()) < EXACT


def test_split_weights_bias_and_row_parts(dev, ref, matmul_path):
    """A matrix bigger than one binding is split by rows; GEMV, GEMM and embed must stitch the parts."""
    rng = np.random.default_rng(7)
    saved = dev.max_binding
    dev.max_binding = 1024  # Q8_0 rows of 96 are 96 quant bytes: 10 rows per part
    try:
        w, w_ref = weights(dev, ref, Q.Q8_0, 45, 96, rng)
    finally:
        dev.max_binding = saved
    assert len(w.storage) == 5
    b = rng.standard_normal(45, dtype=np.float32)
    bias, bias_ref = (d.load_weight("b", Q.F32, b.view(np.uint8), (45,)) for d in (dev, ref))
    for T, gemm in ((1, False), (3, False), (3, True)):
        matmul_path(dev.gemv_tpr, dev.gemv_rpw, gemm)
        x = rng.standard_normal((T, 96), dtype=np.float32)
        out, out_ref = dev.empty((T, 45)), ref.empty((T, 45))
        dev.matmul(dev.upload(x), w, out, bias)
        ref.matmul(ref.upload(x), w_ref, out_ref, bias_ref)
        assert nmse(out.numpy(), out_ref.numpy()) < EXACT
    ids = np.array([44, 0, 9, 10, 31], np.int32)
    out, out_ref = dev.empty((5, 96)), ref.empty((5, 96))
    dev.embed(w, dev.upload(ids), out)
    ref.embed(w_ref, ref.upload(ids), out_ref)
    assert nmse(out.numpy(), out_ref.numpy()) < EXACT


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_rms_norm_in_place_and_not(dev, ref, dtype):
    if not dev.supports_op("rms_norm", (dtype,)):
        pytest.skip(f"rms_norm({dtype}) unsupported on {dev.name}")
    rng = np.random.default_rng(3)
    for rows, d in ((1, 77), (3, 1000)):
        x = rng.standard_normal((rows, d)).astype(DTYPES[dtype])
        wv = rng.standard_normal(d, dtype=np.float32)
        w, w_ref = (dv.load_weight("n", Q.F32, wv.view(np.uint8), (d,)) for dv in (dev, ref))
        (xt, xr), out = both(dev, ref, x), dev.empty((rows, d), dtype)
        dev.rms_norm(xt, w, 1e-5, out)
        ref.rms_norm(xr, w_ref, 1e-5, xr)
        assert nmse(out.numpy(), xr.numpy()) < EXACT
        dev.rms_norm(xt, w, 1e-5, xt)  # in place
        assert nmse(xt.numpy(), xr.numpy()) < EXACT


@pytest.mark.parametrize("neox", [False, True])
def test_rope_far_positions(dev, ref, neox):
    rng = np.random.default_rng(4)
    T, H, hd = 4, 3, 64
    x = rng.standard_normal((T, H * hd), dtype=np.float32)
    pos = np.array([0, 7, 5000, 70000], np.int32)
    (xt, xr), (pt, pr) = both(dev, ref, x), both(dev, ref, pos)
    dev.rope(xt, pt, H, hd, Rope(10000.0, neox))
    ref.rope(xr, pr, H, hd, Rope(10000.0, neox))
    assert nmse(xt.numpy(), xr.numpy()) < EXACT


def _unpaged(d, pos: np.ndarray, n_ctx: int, seq_pos=None) -> KVIndex:
    """One sequence whose position j is cache row j (blocks of one position, in order): the cache layout of the
    cases below. The paged layouts are kiln.conformance's attention cases."""
    pos_t = seq_pos if seq_pos is not None else d.upload(pos)
    table = d.upload(np.arange(n_ctx, dtype=np.int32).reshape(1, n_ctx))
    seq = d.upload(np.zeros(len(pos), np.int32))
    return KVIndex(pos_t, pos_t, seq, table, 1, ((0, len(pos), 0),), int(pos.max()) + 1)


def _attention_case(dev, ref, kv_dtype, T, start, n_heads=4, n_kv_heads=2, hd=64, n_ctx=300, seed=0, act="f32"):
    """NMSE of wgpu's attention output against the reference. Cache rows past the new keys hold NaN (a kernel must
    not let them in) and the output sits between sentinels (no write outside it)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((T, n_heads * hd), dtype=np.float32).astype(DTYPES[act])
    k = rng.standard_normal((T, n_kv_heads * hd), dtype=np.float32).astype(DTYPES[act])
    v = rng.standard_normal((T, n_kv_heads * hd), dtype=np.float32).astype(DTYPES[act])
    cache0 = rng.standard_normal((2, n_kv_heads, n_ctx, hd)).astype(DTYPES[kv_dtype])  # earlier tokens' K/V
    cache0[:, :, start + T :] = np.nan
    pos = np.arange(start, start + T, dtype=np.int32)
    pad = 256 // np.dtype(DTYPES[act]).itemsize  # views start at multiples of 256 bytes
    parent = dev.upload(np.full(2 * pad + T * n_heads * hd, 7, DTYPES[act]))
    outs = []
    for d, out in ((dev, dev.view(parent, pad, (T, n_heads * hd))), (ref, ref.empty((T, n_heads * hd), act))):
        kc, vc = d.upload(cache0[0]), d.upload(cache0[1])
        d.attention(
            d.upload(q), d.upload(k), d.upload(v), kc, vc, _unpaged(d, pos, n_ctx), out, n_heads, n_kv_heads, hd
        )
        outs.append((out.numpy().astype(np.float32), kc.numpy()))
    (got, kc_got), (want, kc_want) = outs
    assert np.array_equal(kc_got, kc_want, equal_nan=True), "K cache rows written differently"
    fence = parent.numpy()
    assert (fence[:pad] == 7).all() and (fence[pad + got.size :] == 7).all(), "attention wrote outside its output"
    dev.free(parent)
    return nmse(got, want)


@pytest.mark.parametrize("kv_dtype", ["f16", "f32"])
@pytest.mark.parametrize("T,start", [(1, 0), (1, 36), (1, 299), (5, 0), (7, 30), (70, 3)])
def test_attention_decode_and_prefill(dev, ref, kv_dtype, T, start):
    assert _attention_case(dev, ref, kv_dtype, T, start) < EXACT


def test_attention_head_dim_80_gqa_3(dev, ref):
    for T, start in ((1, 100), (3, 10)):
        assert _attention_case(dev, ref, dev.kv_dtype, T, start, n_heads=6, n_kv_heads=2, hd=80, n_ctx=130) < EXACT


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_swiglu_add_in_place(dev, ref, dtype):
    if not dev.supports_op("add", (dtype,)):
        pytest.skip(f"add({dtype}) unsupported on {dev.name}")
    rng = np.random.default_rng(5)
    a, b = (rng.standard_normal((3, 333)).astype(DTYPES[dtype]) for _ in range(2))
    (at, ar), (bt, br) = both(dev, ref, a), both(dev, ref, b)
    dev.swiglu(at, bt, at)
    ref.swiglu(ar, br, ar)
    assert nmse(at.numpy(), ar.numpy()) < EXACT
    dev.add(at, bt, bt)
    ref.add(ar, br, br)
    assert nmse(bt.numpy(), br.numpy()) < EXACT


@pytest.mark.parametrize("dtype", ["f32", "i32"])
def test_gather_rows(dev, dtype):
    x = np.arange(4 * 13).reshape(4, 13).astype(DTYPES[dtype])
    out = dev.empty((3, 13), dtype)
    dev.gather_rows(dev.upload(x), dev.upload(np.array([2, 0, 2], np.int32)), out)
    assert np.array_equal(out.numpy(), x[[2, 0, 2]])


def test_argmax_first_of_ties(dev):
    x = np.full((1, 50001), -3.0, np.float32)
    x[0, [123, 40000, 50000]] = 2.5
    assert dev.argmax(dev.upload(x)) == 123
    x[0, 49999] = np.float32(2.5000002)
    assert dev.argmax(dev.upload(x)) == 49999


def test_views_keep_sentinels_and_odd_f16_writes(dev):
    parent = dev.upload(np.full(64 + 50 + 64, 7.0, np.float32))
    view = dev.view(parent, 64, (2, 25))
    a = np.arange(50, dtype=np.float32).reshape(2, 25)
    dev.add(dev.upload(a), dev.upload(a), view)
    got = parent.numpy()
    assert np.array_equal(got[64:114], (2 * a).reshape(-1))
    assert (got[:64] == 7).all() and (got[114:] == 7).all()
    if dev.has_f16:
        parent16 = dev.upload(np.full(128 + 8, 5, np.float16))
        v16 = dev.view(parent16, 128, (3,))
        dev.write(v16, np.array([1, 2, 3], np.float16))
        assert parent16.numpy()[128:].tolist() == [1, 2, 3, 5, 5, 5, 5, 5]
    with pytest.raises(ValueError):
        dev.view(parent, 3, (4,))


def test_user_kernel(dev):
    source = """
    override SCALE: f32 = 1.0;
    struct P { n: u32, bias: f32 }
    @group(0) @binding(0) var<storage, read_write> a: array<f32>;
    @group(0) @binding(1) var<storage, read_write> out: array<f32>;
    @group(0) @binding(2) var<uniform> p: P;
    @compute @workgroup_size(64)
    fn main(@builtin(global_invocation_id) g: vec3<u32>) {
        if (g.x < p.n) { out[g.x] = a[g.x] * SCALE + p.bias; }
    }
    """
    kernel = dev.compile("axpb", source, SCALE=3.0)
    assert dev.compile("axpb", source, SCALE=3.0) is not None
    a = np.arange(100, dtype=np.float32)
    out = dev.zeros((100,))
    dev.launch(kernel, 2, [dev.upload(a), out], params=(100, 0.5))
    assert np.array_equal(out.numpy(), a * 3 + 0.5)
    trusted = dev.compile("axpb", source, trusted=True, SCALE=2.0)  # kiln's own kernels' runtime checks
    dev.launch(trusted, 2, [dev.upload(a), out], params=(100, 0.0))
    assert np.array_equal(out.numpy(), a * 2)


def test_describe_and_supported_ops(dev):
    text = dev.describe()
    assert dev.name in text and "features" in text
    assert dev.supports_op("matmul", ("Q4_K", "f32")) and not dev.supports_op("matmul", ("IQ2_XS",))
    assert dev.kv_dtype == ("f16" if dev.has_f16 else "f32")


# --- fused decode ops (replay's fusion pass) against the unfused ops on the NumPy reference ------------------------

LAYER_SHAPES = {  # d_model, q heads, kv heads, head dim, d_ff: rows that do not fill the GEMV workgroups
    "block32": (96, 4, 1, 24, 160),
    "k_quant": (256, 2, 1, 128, 256),
    "float": (90, 3, 1, 20, 70),
}
SENTINEL = 7.25
GUARD_BYTES = 256  # sentinels on each side of every output (a view must start at a multiple of 256 bytes)


def _guarded(dev, shape, dtype="f32"):
    """A view with GUARD_BYTES of sentinel elements on both sides: (parent, view, guard elements)."""
    n, guard = int(np.prod(shape)), GUARD_BYTES // np.dtype(DTYPES[dtype]).itemsize
    parent = dev.upload(np.full(2 * guard + n, SENTINEL, DTYPES[dtype]))
    return parent, dev.view(parent, guard, shape), guard


def _fused_layer(dev, ref, qtype, neox: bool, bias: bool, steps: int = 4, rope: Rope | None = None):
    """One decode layer through replay() (recorded, fused, re-encoded) on wgpu and op by op on NumPy, `steps`
    positions. Every wgpu output lives in a guarded view. Returns (max NMSE, the plan's op names)."""
    kind = "float" if qtype in (Q.F32, Q.F16, Q.BF16) else "k_quant" if qtype.name.endswith("_K") else "block32"
    d, hq, hkv, hd, d_ff = LAYER_SHAPES[kind]
    n_ctx = 9
    rng = np.random.default_rng(int(qtype) + 10 * neox + 100 * bias)
    mats = {"q": (hq * hd, d), "k": (hkv * hd, d), "v": (hkv * hd, d), "o": (d, hq * hd)}
    mats |= {"g": (d_ff, d), "u": (d_ff, d), "dn": (d, d_ff)}
    raws = {n: quant.random_weight(qtype, r, c, rng, 0.3) for n, (r, c) in mats.items()}
    vecs = {"n1": 1 + 0.2 * rng.standard_normal(d), "n2": 1 + 0.2 * rng.standard_normal(d)}
    if bias:
        vecs |= {
            "bq": rng.standard_normal(hq * hd),
            "bk": rng.standard_normal(hkv * hd),
            "bv": rng.standard_normal(hkv * hd),
        }
    acts = {"x": d, "h": d, "q": hq * hd, "k": hkv * hd, "v": hkv * hd, "a": hq * hd, "g": d_ff, "u": d_ff}
    xs = rng.standard_normal((steps, d), dtype=np.float32)
    outs, parents = {}, []
    for side in (dev, ref):
        w = {n: side.load_weight(n, qtype, raws[n], mats[n]) for n in mats}
        w |= {n: side.load_weight(n, Q.F32, v.astype(np.float32).view(np.uint8), v.shape) for n, v in vecs.items()}
        if side is dev:
            views = {n: _guarded(dev, (1, m)) for n, m in acts.items()}
            views |= {c: _guarded(dev, (hkv, n_ctx, hd), dev.kv_dtype) for c in ("kc", "vc")}
            parents = [(p, g) for p, _, g in views.values()]
            t = {n: v for n, (_, v, _) in views.items()}
            t["pos"] = dev.empty((1,), "i32")
            t["kv"] = _unpaged(dev, np.zeros(1, np.int32), n_ctx, t["pos"])
        else:
            t = {n: ref.empty((1, m)) for n, m in acts.items()}
            t |= {c: ref.zeros((hkv, n_ctx, hd), dev.kv_dtype) for c in ("kc", "vc")}
            t["pos"] = ref.empty((1,), "i32")
            t["kv"] = _unpaged(ref, np.zeros(1, np.int32), n_ctx, t["pos"])
        for c in ("kc", "vc"):
            side.write(t[c], np.zeros((hkv, n_ctx, hd), DTYPES[dev.kv_dtype]))

        def layer(side=side, t=t, w=w):
            side.rms_norm(t["x"], w["n1"], 1e-5, t["h"])
            for n in "qkv":
                side.matmul(t["h"], w[n], t[n], w.get("b" + n))
            side.rope(t["q"], t["pos"], hq, hd, rope or Rope(1e4, neox))
            side.rope(t["k"], t["pos"], hkv, hd, rope or Rope(1e4, neox))
            side.attention(t["q"], t["k"], t["v"], t["kc"], t["vc"], t["kv"], t["a"], hq, hkv, hd)
            side.matmul(t["a"], w["o"], t["h"])
            side.add(t["x"], t["h"], t["x"])
            side.rms_norm(t["x"], w["n2"], 1e-5, t["h"])
            side.matmul(t["h"], w["g"], t["g"])
            side.matmul(t["h"], w["u"], t["u"])
            side.swiglu(t["g"], t["u"], t["g"])
            side.matmul(t["g"], w["dn"], t["h"])
            side.add(t["x"], t["h"], t["x"])

        key = ("fused-layer", qtype.name, neox, bias, rope, 1)
        got = []
        for p in range(steps):
            side.write(t["x"], xs[p : p + 1])
            side.write(t["pos"], np.array([p], np.int32))
            side.replay(key, layer)
            got.append([side.download(t[n]).astype(np.float32).ravel() for n in ("x", "h", "q", "k", "v", "a", "u")])
        got.append([side.download(t[c]).astype(np.float32).ravel() for c in ("kc", "vc")])
        outs[side] = got
        for x in w.values():
            side.free_weight(x)
    for parent, guard in parents:
        raw = parent.numpy()
        assert (raw[:guard] == SENTINEL).all() and (raw[-guard:] == SENTINEL).all(), "write outside an output"
    worst = max(nmse(a, b) for ga, gb in zip(outs[dev], outs[ref]) for a, b in zip(ga, gb))
    return worst, dev.plans[key]


# (format, NeoX, QKV bias, adapter's own GEMV shape): the others run 8 threads x 4 rows, which lavapipe compiles
# in less time than 8 x 8 (CI time); GPU shapes (32 x 8, 64 x 4) are covered below.
FUSED_CASES = [
    (Q.Q8_0, False, False, False),
    (Q.Q4_0, True, True, False),
    (Q.Q4_1, False, True, False),
    (Q.Q5_0, True, False, False),
    (Q.Q5_1, False, False, False),
    (Q.Q4_K, True, True, True),
    (Q.Q5_K, False, False, False),
    (Q.Q6_K, False, True, False),
    (Q.F16, True, False, False),
    (Q.F32, False, True, False),
]


@pytest.mark.parametrize("qtype,neox,bias,own_shape", FUSED_CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_fused_decode_layer(dev, ref, matmul_path, qtype, neox, bias, own_shape):
    """gemv_qkv (norm + QKV + bias + RoPE + KV write), attend, gemv_res (twice), gemv_glu (norm + gate/up +
    SwiGLU) against the unfused ops on NumPy over several positions: outputs, caches, sentinels."""
    if not own_shape:
        matmul_path(8, 4, False)
    err, plan = _fused_layer(dev, ref, qtype, neox, bias, steps=3)
    assert plan == ["gemv_qkv", "attend", "gemv_res", "gemv_glu", "gemv_res"], plan
    assert err < FUSED_NMSE, f"{qtype.name} neox={neox} bias={bias}: NMSE {err:.2e}"


FUSED_NMSE = 1e-6  # the fused norm scales after the dot product instead of before: rounding order only


@pytest.mark.parametrize("neox", [False, True])
def test_fused_decode_layer_scaled_rope(dev, ref, matmul_path, neox):
    """gemv_qkv with yarn on top of llama3 freq factors (inv_freq and mscale from the turns table's extra row)."""
    matmul_path(8, 4, False)
    ff = tuple(1.0 + 7.0 * np.random.default_rng(5).random(LAYER_SHAPES["block32"][3] // 2))
    rope = Rope(5e5, neox, "yarn", 4.0, orig_ctx=64, attn_factor=0.9, freq_factors=ff)
    err, plan = _fused_layer(dev, ref, Q.Q8_0, neox, True, steps=3, rope=rope)
    assert plan == ["gemv_qkv", "attend", "gemv_res", "gemv_glu", "gemv_res"], plan
    assert err < FUSED_NMSE, f"neox={neox}: NMSE {err:.2e}"


@pytest.mark.parametrize("tpr,rpw,subgroups", [(32, 8, False), (64, 4, True), (64, 8, True), (None, None, True)])
def test_fused_decode_layer_gemv_shapes(dev, ref, matmul_path, tpr, rpw, subgroups):
    """GPU GEMV shapes, one wider than any subgroup, with and without subgroup reductions; None: a shape per
    matrix, as GPUs choose (_gemv_shape)."""
    matmul_path(tpr, rpw, False, subgroups)
    err, plan = _fused_layer(dev, ref, Q.Q8_0, True, True, steps=2)
    assert plan == ["gemv_qkv", "attend", "gemv_res", "gemv_glu", "gemv_res"], plan
    assert err < FUSED_NMSE


def test_fused_gemv_norm_and_unfused_switch(dev, ref):
    """rms_norm + matmul -> gemv_norm (the output head); KILN_WGPU_FUSE=0 (fuse_enabled) keeps every op."""
    rng = np.random.default_rng(11)
    K, N = 96, 45
    raw = quant.random_weight(Q.Q4_1, N, K, rng, 0.5)
    nv = (1 + 0.2 * rng.standard_normal(K)).astype(np.float32)
    x = rng.standard_normal((1, K), dtype=np.float32)
    results = []
    for side, fuse in ((dev, True), (dev, False), (ref, True)):
        w = side.load_weight("w", Q.Q4_1, raw, (N, K))
        nw = side.load_weight("n", Q.F32, nv.view(np.uint8), (K,))
        xt, h, out = side.upload(x), side.empty((1, K)), side.empty((1, N))
        saved, side.fuse_enabled = getattr(side, "fuse_enabled", True), fuse
        key = ("norm-matmul", fuse, 1)

        def step(side=side, xt=xt, nw=nw, h=h, w=w, out=out):
            side.rms_norm(xt, nw, 1e-5, h)
            side.matmul(h, w, out)
            side.rms_norm(xt, nw, 1e-5, h)  # h is overwritten before anything reads it: the first norm is dead

        side.replay(key, step)
        side.fuse_enabled = saved
        results.append(out.numpy())
        if side is dev:
            assert dev.plans[key] == (["gemv_norm", "rms_norm"] if fuse else ["rms_norm", "matmul", "rms_norm"])
        side.free_weight(w)
        side.free_weight(nw)
    assert nmse(results[0], results[2]) < FUSED_NMSE
    assert nmse(results[1], results[2]) < EXACT


@pytest.fixture
def attn_kernel(dev):
    """Set the decode attention kernel and its SPLITSxCHUNK (v3: also lanes per key, subgroups on/off) for one
    test; restore after."""
    saved = dev.attn_kernel, dev.attn_splits, dev.attn_chunk, dev.attn3_lanes, dev.use_subgroups

    def use(kernel: str, shape: tuple[int, int], lanes: int | None = None, subgroups: bool = True) -> None:
        dev.set_attention(kernel, shape)
        dev.attn3_lanes = lanes
        dev.use_subgroups = subgroups and dev.has_subgroups

    yield use
    dev.set_attention(saved[0], saved[1:3])
    dev.attn3_lanes, dev.use_subgroups = saved[3:]


@pytest.mark.parametrize("splits", [1, 3])
def test_attention_decode_direct_and_split(dev, ref, attn_kernel, splits):
    """v1 decode attention in one dispatch (one split writes the output) and split + combine, on any adapter."""
    attn_kernel("v1", (splits, 32))
    for start in (0, 40, 299):
        assert _attention_case(dev, ref, dev.kv_dtype, 1, start, seed=start) < EXACT


# v2 (attn_decode2) and v3 (attn_decode3): SPLITSxTILE as on GPUs, on CPU adapters, one split over many tiles, odd
# splits of tiny tiles.
V2_SHAPES = [(32, 32), (4, 64), (1, 16), (3, 8)]
# v3 key sums (lanes per key, subgroups): lanes by head dim (head_dim / 4 rounded up to a power of two, at most 32:
# wider than lavapipe's 8-lane subgroups, so workgroup memory there), 4 or 8 lanes with subgroup shuffles (where the
# adapter has subgroups, as lavapipe does), 8 lanes with subgroups off (workgroup memory). Each v3 pipeline takes
# lavapipe 1-4 s to compile the first time: the grids below are trimmed to keep this file quick.
V3_PATHS = [(None, True), (4, True), (8, True), (8, False)]


def _path_id(path) -> str:
    return f"lanes{path[0] or 'auto'}-{'sg' if path[1] else 'wg'}"


@pytest.mark.parametrize("shape", V2_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kv_dtype", ["f16", "f32"])
def test_attention_v2_key_counts(dev, ref, attn_kernel, shape, kv_dtype):
    """One dispatch: a single key, tile and chunk boundaries, several tiles per split, the whole cache."""
    if kv_dtype == "f16" and not dev.has_f16:
        pytest.skip("no shader-f16")
    attn_kernel("v2", shape)
    for n_kv in (1, 8, 9, 16, 17, 32, 33, 64, 65, 130, 257, 300):
        assert _attention_case(dev, ref, kv_dtype, 1, n_kv - 1, seed=n_kv) < EXACT, f"n_kv={n_kv}"


@pytest.mark.parametrize(
    "kv_dtype,path", [("f16", V3_PATHS[0]), ("f32", V3_PATHS[0]), ("f16", V3_PATHS[1]), ("f32", V3_PATHS[3])]
)
@pytest.mark.parametrize("shape", V2_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_attention_v3_key_counts(dev, ref, attn_kernel, shape, kv_dtype, path):
    """v3, one dispatch: a single key, row / tile / split boundaries (rows of U keys, tiles dealt round-robin),
    several tiles per split, rows without keys, the whole cache; NaN past the keys, sentinels around the output."""
    if kv_dtype == "f16" and not dev.has_f16:
        pytest.skip("no shader-f16")
    attn_kernel("v3", shape, *path)
    for n_kv in (1, 2, 7, 8, 9, 16, 17, 31, 32, 33, 64, 65, 95, 96, 97, 130, 257, 300):
        assert _attention_case(dev, ref, kv_dtype, 1, n_kv - 1, seed=n_kv) < EXACT, f"n_kv={n_kv}"


V2_HEADS = [(4, 4, 64), (6, 2, 80), (16, 2, 64), (8, 1, 128), (2, 2, 128), (3, 1, 256)]


def _heads_case(dev, ref, n_heads, n_kv_heads, hd, f16_out=True):
    for n_kv, act in ((1, "f32"), (40, "f32"), (150, "f32"), (150, "f16")):
        if act == "f16" and not (dev.has_f16 and f16_out):
            continue
        err = _attention_case(dev, ref, dev.kv_dtype, 1, n_kv - 1, n_heads, n_kv_heads, hd, 160, n_kv, act)
        assert err < (EXACT if act == "f32" else 1e-6), f"n_kv={n_kv} act={act}"


@pytest.mark.parametrize("n_heads,n_kv_heads,hd", V2_HEADS)
def test_attention_v2_heads(dev, ref, attn_kernel, n_heads, n_kv_heads, hd):
    """GQA 1, 3, 8 and head dims 64, 80, 128, 256 (smaller tiles where workgroup memory runs out), f16 output.
    (v2 uses no subgroup operations: one path on every adapter.)"""
    attn_kernel("v2", (5, 32))
    _heads_case(dev, ref, n_heads, n_kv_heads, hd)


V3_HEADS = [(4, 4, 64), (6, 2, 80), (16, 2, 64), (8, 1, 128), (2, 2, 128), (16, 1, 256)]


@pytest.mark.parametrize(
    "n_heads,n_kv_heads,hd,path",
    [(*h, V3_PATHS[0]) for h in V3_HEADS] + [(*h, p) for h in V3_HEADS[1::2] for p in (V3_PATHS[2], V3_PATHS[3])],
    ids=lambda v: _path_id(v) if isinstance(v, tuple) else str(v),
)
def test_attention_v3_heads(dev, ref, attn_kernel, n_heads, n_kv_heads, hd, path):
    """v3: GQA 1, 3, 8, 16 and head dims 64, 80 (lanes past the head's columns), 128 (two output vec4s per thread
    at GQA 8), 256 (two columns per lane; GQA 16: the row merge in several passes of heads), f16 output; 8 lanes
    per key with subgroup shuffles and with workgroup memory for three of them (f32 output only)."""
    attn_kernel("v3", (5, 32), *path)
    _heads_case(dev, ref, n_heads, n_kv_heads, hd, f16_out=path == V3_PATHS[0])


@pytest.mark.parametrize("kernel", ["v2", "v3"])
def test_attention_v2_tickets_return_to_zero(dev, ref, attn_kernel, kernel):
    """The last split of each merge leaves its ticket at 0, so back-to-back merges (layers, tokens) stay correct."""
    attn_kernel(kernel, (4, 16))
    for seed in range(3):
        assert _attention_case(dev, ref, dev.kv_dtype, 1, 99, n_heads=8, n_kv_heads=2, seed=seed) < EXACT
    tickets = dev._attn_tickets[2]
    assert not dev._read_bytes(tickets, 0, tickets.size).any()


def test_decode_step_encoded_ahead_matches(dev):
    """A replayed step is encoded ahead while the previous one runs (after a download); the result is the same as
    encoding it at replay time, and freeing a tensor it binds drops the encoded step."""
    rng = np.random.default_rng(12)
    w = dev.load_weight("w", Q.Q8_0, quant.random_weight(Q.Q8_0, 40, 64, rng), (40, 64))
    x, out = dev.upload(rng.standard_normal((1, 64), dtype=np.float32)), dev.empty((1, 40))
    acc = dev.zeros((1, 40))

    def step():
        dev.matmul(x, w, out)
        dev.add(acc, out, acc)  # accumulates: a step submitted twice or skipped shows in the sum

    got = {}
    saved = dev.preencode_enabled
    try:
        for ahead in (True, False):
            dev.preencode_enabled = ahead
            dev.write(acc, np.zeros((1, 40), np.float32))
            before = dev.preencoded
            for _ in range(4):
                dev.replay(("ahead", ahead, 1), step)
                got[ahead] = acc.numpy()
            assert (dev.preencoded - before == 3) if ahead else (dev.preencoded == before)
    finally:
        dev.preencode_enabled = saved
    assert np.array_equal(got[True], got[False])
    assert np.allclose(got[True], 4 * out.numpy(), rtol=1e-5, atol=1e-5)
    dev.preencode_enabled = True
    try:
        dev.replay(("ahead", True, 1), step)
        dev.download(acc)
        assert dev._ready is not None
        dev.free(x)
        assert dev._ready is None and not dev._steps
    finally:
        dev.preencode_enabled = saved
    dev.free_weight(w)


def test_gemv_shape_by_size(dev, matmul_path):
    """With no fixed shape (GPUs): plain and residual GEMVs take more threads on longer rows, 8 rows on tall
    matrices with long rows and 2 on small ones; the SwiGLU (mode 2) and QKV (mode 3) GEMVs as measured."""
    matmul_path(None, None, False)
    assert dev._gemv_shape(2048, 2048) == (64, 4)
    assert dev._gemv_shape(5632, 2048, 1) == (128, 4)
    assert dev._gemv_shape(2048, 32000) == (64, 8)
    assert dev._gemv_shape(576, 1536) == (32, 2)
    assert dev._gemv_shape(576, 49152) == (32, 4)
    assert dev._gemv_shape(576, 3072, 2) == (32, 2)
    assert dev._gemv_shape(2048, 11264, 2) == (64, 8)
    assert dev._gemv_shape(4096, 22016, 2) == (32, 8)
    assert dev._gemv_shape(576, 960, 3) == (32, 2)
    assert dev._gemv_shape(2048, 2560, 3) == (64, 4)
    assert dev._gemv_shape(4096, 12288, 3) == (64, 8)


@pytest.mark.parametrize("checks", ["bounds", "none"])
def test_runtime_checks_switch(dev, ref, monkeypatch, checks):
    """KILN_WGPU_CHECKS: kiln's kernels compiled without naga's loop counters (GPUs' default) or without any check
    give the same results; a wrong value is one clear error."""
    monkeypatch.setenv("KILN_WGPU_CHECKS", checks)
    other = wgpu_backend.WgpuDevice(dev.index)
    try:
        assert other._checks is not None
        rng = np.random.default_rng(5)
        w, w_ref = weights(other, ref, Q.Q8_0, 37, 96, rng)
        x = rng.standard_normal((1, 96), dtype=np.float32)
        out, out_ref = other.empty((1, 37)), ref.empty((1, 37))
        other.matmul(other.upload(x), w, out)
        ref.matmul(ref.upload(x), w_ref, out_ref)
        assert nmse(out.numpy(), out_ref.numpy()) < EXACT
    finally:
        other.close()
    monkeypatch.setenv("KILN_WGPU_CHECKS", "some")
    with pytest.raises(ValueError, match="KILN_WGPU_CHECKS"):
        wgpu_backend.WgpuDevice(dev.index)


def test_timeline_times_each_dispatch(dev):
    """timeline(): one (kernel, microseconds) per dispatch of the last replayed decode step, from GPU timestamps;
    a device without the timestamp features says so when asked for them."""
    try:
        other = wgpu_backend.WgpuDevice(dev.index, timestamps=True)
    except UnsupportedOp as e:
        pytest.skip(str(e))
    try:
        with pytest.raises(RuntimeError, match="no decode step"):
            other.timeline()
        rng = np.random.default_rng(3)
        raw = quant.random_weight(Q.Q8_0, 40, 64, rng)
        w = other.load_weight("w", Q.Q8_0, raw, (40, 64))
        x, h, out = (
            other.upload(rng.standard_normal((1, 64), dtype=np.float32)),
            other.empty((1, 40)),
            other.empty((1, 40)),
        )

        def step():
            other.matmul(x, w, h)
            other.add(h, h, out)

        other.replay(("timeline", 1), step)
        other.replay(("timeline", 1), step)
        times = other.timeline()
        assert [name for name, _ in times] == ["gemv_plain", "elementwise"]
        assert all(us >= 0 for _, us in times)
        assert np.allclose(out.numpy(), 2 * h.numpy())
    finally:
        other.close()
