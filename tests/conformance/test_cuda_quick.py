"""The CUDA backend against the NumPy reference: the quick conformance grid (every op, format and edge case at small
sizes) plus what that grid does not reach: the fused decode kernels (norm + GEMV, QKV + RoPE + KV write, SwiGLU,
residual) against the unfused ops, f16 activations, user kernels, and memory that must stay flat. Skipped cleanly
without CuPy or a GPU."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cupy")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from helpers import cuda_device_or_skip, nmse  # noqa: E402

from kiln import conformance, quant  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.rope import Rope  # noqa: E402
from kiln.runtime.base import KVIndex  # noqa: E402
from kiln.runtime.numpy_backend import NumpyDevice  # noqa: E402


@pytest.fixture(scope="module")
def dev():
    d = cuda_device_or_skip()
    yield d
    d.close()


@pytest.fixture(scope="module")
def ref():
    r = NumpyDevice()
    yield r
    r.close()


@pytest.mark.parametrize("case", conformance.cases(quick=True), ids=lambda c: c.id)
def test_quick_grid(dev, ref, case):
    r = conformance.run_case(dev, case, ref)
    if r.status == "skip":
        pytest.skip(r.message)
    assert r.status == "pass", f"{r.op} {r.case} [{r.dtype}]: {r.message}"


FORMATS = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16", "F32"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [1, 2, 4, 6])
def test_matmul_gemv_and_gemm_paths(dev, ref, fmt, T):
    """T <= 4 runs one GEMV per token, larger T dequantizes for cuBLAS: both against the reference."""
    rng = np.random.default_rng(T)
    qt = Q[fmt]
    N, K = 97, 512
    raw = quant.random_weight(qt, N, K, rng)
    x = rng.standard_normal((T, K), dtype=np.float32)
    outs = []
    for d in (dev, ref):
        w = d.load_weight("w", qt, raw, (N, K))
        xt, ot = d.upload(x), d.empty((T, N))
        d.matmul(xt, w, ot)
        outs.append(d.download(ot))
        d.free_weight(w)
        d.free(xt)
        d.free(ot)
    assert nmse(*outs) < (5e-4 if T > 4 else 1e-9)


# GEMV kernel settings (cuda_backend attributes): kernel, rows per group, pipeline stages, grid cap of the pipelined
# kernel (a few blocks, so each walks many groups of rows through its pipeline).
GEMV_KERNELS = {
    "warp": dict(gemv_kernel="warp"),
    "block": dict(gemv_kernel="block"),
    "block-r4": dict(gemv_kernel="block", gemv_rows=4),
    "block-float": dict(gemv_kernel="block", gemv_xq=False),  # Q8_0 without the integer dots
    "pipe-s2": dict(gemv_kernel="pipe", gemv_stages=2, gemv_max_blocks=3),
    "pipe-s3": dict(gemv_kernel="pipe", gemv_stages=3, gemv_max_blocks=5),
    "pipe-r4-s4": dict(gemv_kernel="pipe", gemv_rows=4, gemv_stages=4, gemv_max_blocks=2),
    "pipe-r16": dict(gemv_kernel="pipe", gemv_rows=16, gemv_stages=2),
    "pipe-grid": dict(gemv_kernel="pipe"),  # the occupancy-sized grid
    "auto": dict(gemv_kernel="auto"),
}


@pytest.fixture
def gemv_kernel(dev, request):
    """Set the backend's GEMV kernel choice for one test, restored after it."""
    saved = {k: getattr(dev, k) for k in ("gemv_kernel", "gemv_rows", "gemv_stages", "gemv_max_blocks", "gemv_xq")}
    for k, v in GEMV_KERNELS[request.param].items():
        setattr(dev, k, v)
    yield request.param
    for k, v in saved.items():
        setattr(dev, k, v)


@pytest.mark.parametrize("gemv_kernel", list(GEMV_KERNELS), indirect=True)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("N,K", [(97, 512), (301, 2048), (40, 1536)])
def test_gemv_kernels(dev, ref, gemv_kernel, fmt, N, K):
    """Every GEMV kernel shape (the pipelined one where the format allows, else the one it falls back to), row counts
    that leave partial groups, and grids that make each block walk several groups, against the reference."""
    rng = np.random.default_rng(N + K)
    qt = Q[fmt]
    raw = quant.random_weight(qt, N, K, rng)
    x = rng.standard_normal((1, K), dtype=np.float32)
    outs = []
    for d in (dev, ref):
        w = d.load_weight("w", qt, raw, (N, K))
        xt = d.upload(x)
        buf = d.upload(np.full(N + 64, 7.0, np.float32))  # 64 sentinels after the N outputs
        d.matmul(xt, w, d.view(buf, 0, (1, N)))
        outs.append(d.download(buf))
        d.free_weight(w)
        d.free(xt)
        d.free(buf)
    got, want = outs
    assert np.isfinite(got).all()
    assert (got[N:] == 7.0).all(), "the GEMV wrote past its rows"
    assert nmse(got[:N], want[:N]) < 1e-9


def _unpaged(d, pos, n_ctx: int) -> KVIndex:
    """One decode token whose sequence's position j is cache row j (blocks of one position): these cases' layout;
    the paged layouts are kiln.conformance's attention cases. Positions are read from `pos` on the device."""
    table = d.upload(np.arange(n_ctx, dtype=np.int32).reshape(1, n_ctx))
    return KVIndex(pos, pos, d.upload(np.zeros(1, np.int32)), table, 1, ((0, 1, 0),), n_ctx)


def _fused_case(dev, fmt: str, neox: bool, bias: bool, rope: Rope | None = None):
    """One decode layer recorded through replay() (fused, graph-captured) and the same ops unfused."""
    rope = rope or Rope(1e4, neox)
    rng = np.random.default_rng(7)
    qt = Q[fmt]
    d_model, hq, hkv, hd, d_ff, n_ctx = 256, 4, 2, 64, 512, 40
    w = {
        n: dev.load_weight(n, qt, quant.random_weight(qt, r, c, rng, 0.1), (r, c))
        for n, r, c in (
            ("q", hq * hd, d_model),
            ("k", hkv * hd, d_model),
            ("v", hkv * hd, d_model),
            ("o", d_model, hq * hd),
            ("g", d_ff, d_model),
            ("u", d_ff, d_model),
            ("dn", d_model, d_ff),
        )
    }
    f32 = Q.F32
    vec = {
        n: dev.load_weight(n, f32, (1 + 0.1 * rng.standard_normal(m)).astype(np.float32).view(np.uint8), (m,))
        for n, m in (("n1", d_model), ("n2", d_model))
    }
    biases = (
        {
            n: dev.load_weight("b" + n, f32, (0.1 * rng.standard_normal(m)).astype(np.float32).view(np.uint8), (m,))
            for n, m in (("q", hq * hd), ("k", hkv * hd), ("v", hkv * hd))
        }
        if bias
        else {}
    )
    t = {
        n: dev.empty(s)
        for n, s in (
            ("x", (1, d_model)),
            ("h", (1, d_model)),
            ("q", (1, hq * hd)),
            ("k", (1, hkv * hd)),
            ("v", (1, hkv * hd)),
            ("a", (1, hq * hd)),
            ("g", (1, d_ff)),
            ("u", (1, d_ff)),
        )
    }
    kc = dev.zeros((hkv, n_ctx, hd), "f16")
    vc = dev.zeros((hkv, n_ctx, hd), "f16")
    pos = dev.empty((1,), "i32")
    kv = _unpaged(dev, pos, n_ctx)

    def layer():
        dev.rms_norm(t["x"], vec["n1"], 1e-5, t["h"])
        for n in "qkv":
            dev.matmul(t["h"], w[n], t[n], biases.get(n))
        dev.rope(t["q"], pos, hq, hd, rope)
        dev.rope(t["k"], pos, hkv, hd, rope)
        dev.attention(t["q"], t["k"], t["v"], kc, vc, kv, t["a"], hq, hkv, hd)
        dev.matmul(t["a"], w["o"], t["h"])
        dev.add(t["x"], t["h"], t["x"])
        dev.rms_norm(t["x"], vec["n2"], 1e-5, t["h"])
        dev.matmul(t["h"], w["g"], t["g"])
        dev.matmul(t["h"], w["u"], t["u"])
        dev.swiglu(t["g"], t["u"], t["g"])
        dev.matmul(t["g"], w["dn"], t["h"])
        dev.add(t["x"], t["h"], t["x"])

    x0 = rng.standard_normal((6, d_model), dtype=np.float32)
    results = {}
    for mode in ("fused", "plain"):
        dev.write(kc, np.zeros(kc.shape, np.float16))
        dev.write(vc, np.zeros(vc.shape, np.float16))
        outs = []
        for p in range(6):  # 6 positions through one captured graph
            dev.write(t["x"], x0[p : p + 1])
            dev.write(pos, np.array([p], np.int32))
            if mode == "fused":
                settings = (dev.gemv_kernel, dev.gemv_rows, dev.gemv_stages, dev.gemv_xq)
                dev.replay(("layer", fmt, rope, bias, *settings), layer)
            else:
                layer()
            outs.append(np.concatenate([dev.download(t[n]).ravel() for n in ("x", "q", "k", "v", "u")]))
        results[mode] = (np.array(outs), dev.download(kc).astype(np.float32))
    for x in [*w.values(), *vec.values(), *biases.values()]:
        dev.free_weight(x)
    for x in [*t.values(), kc, vc, pos]:
        dev.free(x)
    return results


@pytest.mark.parametrize(
    "fmt,neox,bias",
    [("Q8_0", False, False), ("Q4_K", True, True), ("Q6_K", False, True), ("Q5_0", True, False), ("F16", False, False)],
)
@pytest.mark.parametrize("gemv_kernel", ["warp", "block", "pipe-s3", "pipe-r4-s4"], indirect=True)
def test_fused_decode_matches_unfused(dev, fmt, neox, bias, gemv_kernel):
    r = _fused_case(dev, fmt, neox, bias)
    assert len(dev._graphs) == 0  # the graph went away with the buffers it used
    assert nmse(r["fused"][0], r["plain"][0]) < 1e-8
    assert nmse(r["fused"][1], r["plain"][1]) < 1e-6


@pytest.mark.parametrize("scaling", ["yarn", "llama3+yarn"])
def test_fused_decode_scaled_rope(dev, scaling):
    """gemv_qkv's cos/sin table with yarn's mscale and freq factors (rope.py) equals the standalone rope kernel's."""
    ff = tuple(1.0 + 7.0 * np.random.default_rng(5).random(32)) if scaling == "llama3+yarn" else None
    rope = Rope(5e5, True, "yarn", 4.0, orig_ctx=256, attn_factor=0.7, freq_factors=ff)  # mscale 0.80
    r = _fused_case(dev, "Q8_0", True, True, rope)
    unscaled = _fused_case(dev, "Q8_0", True, True)
    assert nmse(r["fused"][0], r["plain"][0]) < 1e-8
    assert nmse(r["fused"][1], r["plain"][1]) < 1e-6
    assert nmse(r["fused"][0], unscaled["fused"][0]) > 1e-4  # the scaling reached the fused kernel


@pytest.mark.parametrize("tile,splits", [(32, 64), (32, 2), (64, 3), (128, 64)])
@pytest.mark.parametrize("heads", [(8, 1, 64), (9, 3, 64), (8, 8, 128), (16, 2, 64)])
@pytest.mark.parametrize("per_block", [1, 2, 8])
@pytest.mark.parametrize("graph", [False, True])
def test_decode_attention_tiles_and_splits(dev, ref, tile, splits, heads, per_block, graph):
    """attn_decode.cu at positions on both sides of tile boundaries, with one block per tile, several tiles per block
    (few splits) and the merge, 1 to 8 query heads per block, eagerly and replayed from a captured graph, where the
    cache rows below pos are fetched before the wait for the kernel that wrote row pos (PDL): against the
    reference."""
    hq, hkv, hd = heads
    rng = np.random.default_rng(hq * hd + tile)
    n_ctx = 300
    cache = rng.standard_normal((hkv, n_ctx, hd)).astype(np.float16)
    saved = dev.attn_tile, dev.attn_max_splits, dev.attn_heads_per_block
    dev.attn_tile, dev.attn_max_splits, dev.attn_heads_per_block = tile, splits, per_block
    tensors = {}
    try:
        for d in (dev, ref):
            tensors[d] = dict(
                q=d.empty((1, hq * hd)),
                k=d.empty((1, hkv * hd)),
                v=d.empty((1, hkv * hd)),
                out=d.empty((1, hq * hd)),
                pos=d.empty((1,), "i32"),
                kc=d.upload(cache),
                vc=d.upload(cache[:, ::-1].copy()),
            )
            tensors[d]["kv"] = _unpaged(d, tensors[d]["pos"], n_ctx)
        for p in (0, 1, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 299):
            outs = []
            for d in (dev, ref):
                t = tensors[d]
                for name, shape in (("q", (1, hq * hd)), ("k", (1, hkv * hd)), ("v", (1, hkv * hd))):
                    d.write(t[name], np.random.default_rng(p).standard_normal(shape, dtype=np.float32))
                d.write(t["pos"], np.array([p], np.int32))

                def step(d=d, t=t):
                    d.attention(t["q"], t["k"], t["v"], t["kc"], t["vc"], t["kv"], t["out"], hq, hkv, hd)

                if d is dev and graph:
                    dev.replay(("attn-test", tile, splits, heads, per_block), step)
                else:
                    step()
                outs.append(d.download(t["out"]))
            assert np.isfinite(outs[0]).all()
            assert nmse(*outs) < 1e-6, f"position {p}"
    finally:
        dev.attn_tile, dev.attn_max_splits, dev.attn_heads_per_block = saved
        for d, t in tensors.items():
            kv = t.pop("kv", None)
            for x in [*t.values(), *((kv.seq, kv.table) if kv else ())]:
                d.free(x)


@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "add", "rope"])
def test_f16_activations(dev, ref, op):
    rng = np.random.default_rng(3)
    T, n = 3, 256
    a = rng.standard_normal((T, n)).astype(np.float16)
    b = rng.standard_normal((T, n)).astype(np.float16)
    outs = []
    for d in (dev, ref):
        at, bt, ot = d.upload(a), d.upload(b), d.empty((T, n), "f16")
        if op == "rms_norm":
            w = d.load_weight("n", Q.F32, np.ones(n, np.float32).view(np.uint8), (n,))
            d.rms_norm(at, w, 1e-5, ot)
            d.free_weight(w)
        elif op == "rope":
            pos = d.upload(np.array([3, 4, 5], np.int32))
            d.rope(at, pos, 4, 64, Rope(1e4, False))
            ot, at = at, ot
            d.free(pos)
        else:
            getattr(d, op)(at, bt, ot)
        outs.append(d.download(ot).astype(np.float32))
        for x in (at, bt, ot):
            d.free(x)
    assert nmse(*outs) < 1e-6


def test_memory_flat_and_released(dev):
    """Repeating the same work allocates nothing new; freeing gives the bytes back."""
    rng = np.random.default_rng(1)
    raw = quant.random_weight(Q.Q4_K, 64, 512, rng)

    def work():
        w = dev.load_weight("w", Q.Q4_K, raw, (64, 512))
        x, o = dev.upload(rng.standard_normal((9, 512), dtype=np.float32)), dev.empty((9, 64))
        dev.matmul(x, w, o)
        dev.download(o)
        dev.free_weight(w)
        dev.free(x)
        dev.free(o)

    work()
    before = dev.memory_stats()
    for _ in range(5):
        work()
    after = dev.memory_stats()
    for key in ("bytes_in_use", "weight_bytes", "allocations", "device_pool_bytes"):
        assert after[key] == before[key], key


def test_unavailable_device_index_is_clear(dev):
    from kiln.runtime.cuda_backend import CudaDevice

    with pytest.raises(KilnError, match="no device 99"):
        CudaDevice(99)
