"""The conformance suite: every op of every backend against the NumPy reference, plus the basic compute cases.

Modelled on llama.cpp's test-backend-ops. It ships inside the package so `kiln selftest` can check the device a
user actually has (a Mac's Metal, an AMD or Intel GPU): the paths we cannot run ourselves are verified where they
run. Each case builds its inputs from a seeded RNG, runs the op on the device under test and on `NumpyDevice`,
and compares every output:

- NMSE = sum((a - b)^2) / sum(b^2) against a per-op threshold, and the largest single error relative to rms(b)
  against a second one (`THRESHOLDS`, each documented there): a global NMSE dilutes a localised bug (the last
  tile of a 4099-row matmul), the max-error bound does not;
- any NaN/Inf fails; argmax and the integer basic cases compare exactly;
- outputs are `device.view()`s in the middle of a larger buffer: GUARD_BYTES of a sentinel pattern on each side
  must be intact afterwards (out-of-bounds writes), and the output region itself starts as sentinel, so an
  element the op never writes shows up as a huge error;
- allocations are freed whatever happens; a leak is memory (`memory_stats()` bytes_in_use / weight bytes) that
  grows again when the same case runs a second time (the first run may create persistent scratch buffers);
- `supports_op(op, dtypes)` False is a skip with the reason, never a pass; an exception is a fail with its message
  and never stops the suite.

`dtypes` asked of `supports_op`: the GGUF type name for weight ops (embed, matmul, rms_norm: "Q4_K", "F32", ...,
as `Device.check_tensors` asks), the KV-cache dtype for attention (`device.kv_dtype`), "f32" for the rest.

Launch convention for the basic compute cases (what `Device.compile` / `Device.launch` must implement)
------------------------------------------------------------------------------------------------------
`kernel = device.compile(name, source, **constants)`; `device.launch(kernel, grid, buffers, params=None,
block=None)`. Sources: kernels/wgsl/<name>.wgsl on WebGPU, kernels/cuda/<name>.cu on CUDA (chosen by
`device.kernel_language` if set, else by backend name: wgpu -> "wgsl", cuda -> "cuda").

- Entry point: WGSL: the `@compute fn main`. CUDA: the `extern "C" __global__` function called `name` (C++
  reserves `main`).
- constants (numbers): WGSL: pipeline-overridable constants (`override WG: u32 = 64u;`), usable in
  `@workgroup_size` and workgroup array sizes. CUDA: preprocessor defines (NVRTC `-DNAME=value`).
- buffers: a list of kiln Tensors, views included (a view binds its parent at byte offset `offset * itemsize`,
  a multiple of 256, with its own size). WGSL: storage buffers at `@group(0) @binding(i)` for buffers[i], in
  order; the shader may declare each `read` or `read_write` (the layout comes from the shader, layout "auto", so
  every binding must be used by the entry point). CUDA: the kernel's first arguments are the buffers' device
  pointers, in order (a view's offset already added).
- params: None or a sequence of 4-byte scalars: a Python float is f32, a Python int is u32 (i32 if negative);
  np.float32 / np.int32 / np.uint32 keep their type. WGSL: packed little-endian in order, 4 bytes each,
  zero-padded to a multiple of 16 bytes, bound as a uniform buffer at `@binding(len(buffers))` and declared as
  a struct of those scalars in the same order. CUDA: appended to the kernel arguments after the pointers, as
  float / unsigned int / int (never double: a Python float must go as np.float32).
- grid: the number of workgroups (WGSL) or blocks (CUDA), an int or a tuple of up to 3 ints.
  block: CUDA's threads per block (int or tuple); WGSL ignores it (the workgroup size is in the shader). The
  cases pass the same numbers to both, so WGSL's @workgroup_size equals CUDA's block.
- Ordering: launches run in order (a later launch sees an earlier one's writes, with no sync in between), and
  `download()` returns data that includes every recorded launch (it flushes), as for the model ops.
- `compile`/`launch` raising UnsupportedOp (the base class default) makes the basic cases skip.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import quant
from .errors import UnsupportedOp
from .rope import Rope, llama3_freq_factors
from .runtime.base import DTYPES, MODEL_OPS, Device, KVIndex, Tensor, Weight

__all__ = ["CaseResult", "Case", "THRESHOLDS", "cases", "run_case", "run_suite", "format_table", "summary"]

GUARD_BYTES = 256  # sentinel bytes each side of an output; also WebGPU's largest storage-offset alignment
SENTINEL = 0xDEADBEEF  # as f32: -6.3e18, as f16 pairs: -1.73 / -427, as u32 itself
# Per op: (NMSE threshold, max error threshold). NMSE bounds the overall error; max error = max|a - b| / rms(b)
# bounds any single element, which a global NMSE dilutes (one wrong column of a 4099-wide matmul is NMSE 2.4e-4).
# Each is what a correct f32 GPU kernel meets with a wide margin and as tight as that allows. Measured on NumPy
# emulations of GPU-style kernels (tree-reduced sums, f32 rope angles, chunked online softmax, chunked matmul
# accumulation): reordered f32 sums give NMSE ~1e-13, while one f16 rounding of the data gives ~1e-7 and a wrong
# row/block/pairing >= 1e-3.
THRESHOLDS: dict[str, tuple[float, float]] = {
    # Pure data movement (dequantization is exact f32 arithmetic): bit-exact except for FMA contraction in K-quant
    # dequant (1 ulp). Tight enough to catch data silently kept in f16 or bf16 (NMSE ~1e-7 / 1e-5).
    "embed": (1e-12, 1e-5),
    "gather_rows": (1e-12, 1e-5),
    "add": (1e-12, 1e-5),  # one correctly rounded add per element: bit-exact
    # f32 reductions and transcendentals: reordered sums, rsqrt/exp of a few ulp (measured NMSE ~1e-14, max ~1e-6);
    # still 100x below an f16 intermediate.
    "rms_norm": (1e-9, 2.5e-4),
    "swiglu": (1e-9, 2.5e-4),
    # Angles computed in f32 (pos * inv_freq, the usual GPU way; the reference uses f64) are off by up to half an
    # ulp of the angle, 2.4e-4 rad at position 4096, and GPU sin/cos reduce large arguments with a similar error:
    # measured NMSE 2e-9, max 4e-4; the bounds allow 4x that angle error on a 4-sigma element.
    "rope": (1e-7, 1e-2),
    # f32 scores and softmax; the reference's cache is in the device's kv_dtype, so f16-cache rounding matches
    # exactly. Room for flash-style kernels keeping probabilities in f16 (measured NMSE 4e-8, max 1.3e-3).
    "attention": (1e-6, 8e-3),
    # Allows the usual GPU shortcuts: activations quantized to 8 bits per 32-block for integer dot products
    # (llama.cpp's q8_1 path: measured NMSE 3e-5 typical, 1.5e-4 for a single output, max 2.5e-2) and
    # f16/bf16/tf32 tensor-core GEMM (~1e-7..2e-6). A pure f32 kernel gets ~2e-13.
    "matmul": (5e-4, 0.18),
    "argmax": (0.0, 0.0),  # exact: the inputs have no ties
    "basic": (0.0, 0.0),  # integer-valued data, so every result is exact
}
# The cache write is a copy: exact for f32; f16 allows a conversion that is not round-to-nearest-even (1 ulp).
KV_CACHE_THRESHOLDS: dict[str, tuple[float, float]] = {"f32": (1e-12, 1e-5), "f16": (1e-6, 8e-3)}


# ---------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class CaseResult:
    op: str
    case: str
    dtype: str
    status: str  # "pass" | "fail" | "skip"
    nmse: float | None = None
    threshold: float | None = None
    message: str = ""
    seconds: float = 0.0
    max_err: float | None = None  # largest |a - b| / rms(b) over the outputs

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Case:
    """One op on one shape/format. `run(dev, scope, **params)` records the op with inputs from `seed`; outputs
    come from the scope's guarded buffers plus whatever `run` returns. `expect` (basic cases) gives the expected
    outputs directly instead of running the reference device."""

    op: str
    name: str
    dtype: str  # the format shown in the table; "kv" means the device's kv_dtype
    dtypes: tuple[str, ...]  # asked of supports_op ("kv" resolved likewise)
    run: Callable[..., dict]
    params: dict = field(default_factory=dict)
    quick: bool = True
    expect: Callable[..., dict] | None = None

    @property
    def id(self) -> str:
        return f"{self.op}-{self.dtype}-{self.name}".replace(" ", "_")

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())


class _Skip(Exception):
    """The backend says it cannot run this case (no user kernels): reported as skipped."""


# ---------------------------------------------------------------------------------------------------------------
# Guarded allocations


def _sentinel(n: int, dtype: str) -> np.ndarray:
    nbytes = n * np.dtype(DTYPES[dtype]).itemsize
    words = np.full(-(-nbytes // 4), SENTINEL, np.uint32)
    return words.view(np.uint8)[:nbytes].view(DTYPES[dtype]).copy()


@dataclass
class _Guarded:
    key: str
    parent: Tensor
    host: np.ndarray  # what the whole buffer held before the op
    start: int
    shape: tuple[int, ...]
    output: bool
    threshold: tuple[float, float] | None


class _Scope:
    """Everything one case allocates on one device: guarded outputs, inputs, weights. Frees all of it."""

    def __init__(self, dev: Device, seed: int):
        self.dev, self.seed, self.rng = dev, seed, np.random.default_rng(seed)
        self.tensors: list[Tensor] = []
        self.weights: list[Weight] = []
        self.guarded: list[_Guarded] = []

    def input(self, array: np.ndarray) -> Tensor:
        t = self.dev.upload(array)
        self.tensors.append(t)
        return t

    def weight(self, qtype: GGMLQuantizationType, raw: np.ndarray, shape: tuple[int, ...]) -> Weight:
        w = self.dev.load_weight(f"conformance.{qtype.name}", qtype, raw, shape)
        self.weights.append(w)
        return w

    def output(
        self,
        key: str,
        shape: tuple[int, ...],
        dtype: str = "f32",
        init: np.ndarray | None = None,
        guard_fill: float | None = None,
        output: bool = True,
        threshold: tuple[float, float] | None = None,
    ) -> Tensor:
        """A view of `shape` GUARD_BYTES into a sentinel-filled buffer (`init` fills the view itself)."""
        itemsize = np.dtype(DTYPES[dtype]).itemsize
        n, g = math.prod(shape), GUARD_BYTES // itemsize
        tail = g + (-n * itemsize % 4) // itemsize  # keep the whole buffer a multiple of 4 bytes
        host = _sentinel(g + n + tail, dtype)
        if guard_fill is not None:
            host[:g] = host[g + n :] = guard_fill
        if init is not None:
            host[g : g + n] = np.asarray(init, DTYPES[dtype]).reshape(-1)
        parent = self.dev.empty(host.shape, dtype)
        self.tensors.append(parent)
        self.dev.write(parent, host)
        self.guarded.append(_Guarded(key, parent, host, g, tuple(shape), output, threshold))
        return self.dev.view(parent, g, tuple(shape))

    def read(self) -> tuple[dict[str, np.ndarray], dict[str, tuple[float, float] | None], list[str]]:
        """Outputs, their threshold overrides, and a message per guard that was written."""
        outs, thresholds, problems = {}, {}, []
        for g in self.guarded:
            data = np.asarray(self.dev.download(g.parent)).reshape(-1)
            n = math.prod(g.shape)
            end = g.start + n
            bad_before = np.flatnonzero(_bits(data[: g.start]) != _bits(g.host[: g.start]))
            bad_after = np.flatnonzero(_bits(data[end:]) != _bits(g.host[end:]))
            if bad_before.size:
                problems.append(
                    f"{g.key}: {bad_before.size} guard elements before the start written "
                    f"(nearest at start-{g.start - bad_before[-1]})"
                )
            if bad_after.size:
                problems.append(
                    f"{g.key}: {bad_after.size} guard elements after the end written (first at end+{bad_after[0]})"
                )
            if g.output:
                outs[g.key] = data[g.start : end].reshape(g.shape)
                thresholds[g.key] = g.threshold
            elif np.any(_bits(data[g.start : end]) != _bits(g.host[g.start : end])):
                problems.append(f"{g.key}: an input was modified")
        return outs, thresholds, problems

    def close(self) -> None:
        for w in self.weights:
            self.dev.free_weight(w)
        for t in self.tensors:
            self.dev.free(t)
        self.weights, self.tensors, self.guarded = [], [], []


def _bits(a: np.ndarray) -> np.ndarray:
    """Compare raw bits, element by element (a NaN sentinel must equal itself, -0 must differ from 0)."""
    return a.view(f"u{a.dtype.itemsize}")


# ---------------------------------------------------------------------------------------------------------------
# Model-op cases. Each runner gets the device, a scope (with the case's seeded rng) and the case params.

Q = GGMLQuantizationType


def _vector_weight(s: _Scope, qtype: GGMLQuantizationType, values: np.ndarray) -> Weight:
    np_type = {Q.F32: np.float32, Q.F16: np.float16}[qtype]  # what rms_norm weights and biases come in
    raw = np.ascontiguousarray(values.astype(np_type)).view(np.uint8)
    return s.weight(qtype, raw, (values.size,))


def _run_embed(dev, s: _Scope, *, qtype: str, vocab: int, d: int, ids: Sequence[int]) -> dict:
    qt = Q[qtype]
    w = s.weight(qt, quant.random_weight(qt, vocab, d, s.rng), (vocab, d))
    ids_t = s.input(np.asarray(ids, np.int32))
    dev.embed(w, ids_t, s.output("out", (len(ids), d)))
    return {}


def _run_rms_norm(dev, s: _Scope, *, qtype: str, T: int, d: int, eps: float, inplace: bool, scale: float) -> dict:
    x = ((s.rng.standard_normal((T, d)) + 0.2) * scale).astype(np.float32)
    w = _vector_weight(s, Q[qtype], 1 + 0.5 * s.rng.standard_normal(d))
    if inplace:
        xt = s.output("out", (T, d), init=x)
        dev.rms_norm(xt, w, eps, xt)
    else:
        dev.rms_norm(s.input(x), w, eps, s.output("out", (T, d)))
    return {}


def _run_matmul(dev, s: _Scope, *, qtype: str, T: int, N: int, K: int, bias: bool) -> dict:
    qt = Q[qtype]
    w = s.weight(qt, quant.random_weight(qt, N, K, s.rng), (N, K))
    x = s.input(s.rng.standard_normal((T, K), dtype=np.float32))
    b = _vector_weight(s, Q.F32, s.rng.standard_normal(N) * 0.1) if bias else None
    dev.matmul(x, w, s.output("out", (T, N)), b)
    return {}


def _run_rope(dev, s: _Scope, *, T: int, start: int, n_heads: int, head_dim: int, rope: Rope) -> dict:
    x = s.output("x", (T, n_heads * head_dim), init=s.rng.standard_normal((T, n_heads * head_dim)))
    pos = s.input(np.arange(start, start + T, dtype=np.int32))
    dev.rope(x, pos, n_heads, head_dim, rope)
    return {}


def _scaled_ropes(head_dim: int, neox: bool) -> list[tuple[str, Rope]]:
    """One rope per scaling llama.cpp applies: Llama 3.1's freq factors, linear x4, Qwen2.5-style yarn x4 (pairs
    on both sides of the ramp, mscale 1.139), and yarn on top of freq factors with an attn_factor."""
    ff = llama3_freq_factors(5e5, head_dim)
    return [
        ("llama3", Rope(5e5, neox, freq_factors=ff)),
        ("linear x4", Rope(1e4, neox, "linear", 4.0)),
        ("yarn x4 orig=4096", Rope(1e6, neox, "yarn", 4.0, orig_ctx=4096)),
        ("llama3+yarn x2 attn=0.9", Rope(5e5, neox, "yarn", 2.0, orig_ctx=2048, attn_factor=0.9, freq_factors=ff)),
    ]


def _paged_layout(rng, seqs, block_size: int, shared: int) -> tuple[int, list[list[int]]]:
    """Pool size and block tables for sequences [(start, new tokens)]: blocks scattered over the pool in random
    order, block 0 left to padding; with `shared`, sequence 1 starts with sequence 0's first `shared` blocks (both
    prefixes identical and only read). Table entries past a sequence's blocks point at other blocks."""
    need = [-(-(start + n) // block_size) for start, n in seqs]
    n_blocks = 1 + sum(need) + 3
    order = list(rng.permutation(np.arange(1, n_blocks)))
    tables = [[int(order.pop()) for _ in range(k)] for k in need]
    if shared:
        tables[1][:shared] = tables[0][:shared]
    return n_blocks, tables


def _run_attention(
    dev,
    s: _Scope,
    *,
    seqs: tuple[tuple[int, int], ...],
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    block_size: int,
    shared: int,
    kv_dtype: str,
) -> dict:
    rng = s.rng
    n_blocks, tables = _paged_layout(rng, seqs, block_size, shared)
    W = max(len(t) for t in tables) + 1
    pos, slot, seq, runs = [], [], [], []
    for row, (start, n) in enumerate(seqs):
        runs.append((len(pos), n, row))
        for p in range(start, start + n):
            pos.append(p)
            slot.append(tables[row][p // block_size] * block_size + p % block_size)
            seq.append(row)
    table = rng.integers(1, n_blocks, (len(seqs), W)).astype(np.int32)
    for row, blocks in enumerate(tables):
        table[row, : len(blocks)] = blocks
    T = len(pos)
    q = s.input(rng.standard_normal((T, n_heads * head_dim), dtype=np.float32))
    k = s.input(rng.standard_normal((T, n_kv_heads * head_dim), dtype=np.float32))
    v = s.input(rng.standard_normal((T, n_kv_heads * head_dim), dtype=np.float32))
    cache_shape = (n_kv_heads, n_blocks * block_size, head_dim)  # stale data everywhere the op must not write
    limit = KV_CACHE_THRESHOLDS[kv_dtype]
    kc = s.output("k_cache", cache_shape, kv_dtype, init=rng.standard_normal(cache_shape), threshold=limit)
    vc = s.output("v_cache", cache_shape, kv_dtype, init=rng.standard_normal(cache_shape), threshold=limit)
    ints = [s.input(np.asarray(x, np.int32)) for x in (pos, slot, seq)]
    kv = KVIndex(*ints, s.input(table), block_size, tuple(runs), max(pos) + 1)
    out = s.output("out", (T, n_heads * head_dim))
    dev.attention(q, k, v, kc, vc, kv, out, n_heads, n_kv_heads, head_dim)
    return {}


def _elementwise(op, s: _Scope, first: np.ndarray, second: np.ndarray, inplace: bool) -> dict:
    """op(first, second, out) into a fresh output, or in place into first (which is then the guarded output)."""
    b = s.input(second)
    if inplace:
        a = s.output("out", first.shape, init=first)
        op(a, b, a)
    else:
        op(s.input(first), b, s.output("out", first.shape))
    return {}


def _run_swiglu(dev, s: _Scope, *, T: int, n: int, inplace: bool) -> dict:
    gate = (s.rng.standard_normal((T, n)) * 4).astype(np.float32)
    gate.reshape(-1)[: min(8, gate.size)] = [-90, 90, -20, 20, 0, -1e-3, 1e-3, 5][: min(8, gate.size)]  # exp overflow
    return _elementwise(dev.swiglu, s, gate, s.rng.standard_normal((T, n), dtype=np.float32), inplace)


def _run_add(dev, s: _Scope, *, T: int, n: int, inplace: bool) -> dict:
    a = s.rng.standard_normal((T, n), dtype=np.float32)
    return _elementwise(dev.add, s, a, s.rng.standard_normal((T, n), dtype=np.float32), inplace)


def _run_gather_rows(dev, s: _Scope, *, T: int, d: int, rows: tuple[int, ...]) -> dict:
    x = s.input(s.rng.standard_normal((T, d), dtype=np.float32))
    dev.gather_rows(x, s.input(np.asarray(rows, np.int32)), s.output("out", (len(rows), d)))
    return {}


def _run_argmax(dev, s: _Scope, *, n: int, at: int, negative: bool) -> dict:
    values = (s.rng.permutation(n) - (n + 10 if negative else n // 2)).astype(np.float32) * np.float32(1e-3)
    top = int(np.argmax(values))
    values[[top, at]] = values[[at, top]]  # no ties (a permutation); the maximum moved to `at`
    # The guard holds huge values: an out-of-bounds read becomes the answer.
    x = s.output("x", (1, n), init=values, guard_fill=3e38, output=False)
    return {"index": np.array([dev.argmax(x)], np.int64)}


# ---------------------------------------------------------------------------------------------------------------
# Basic compute cases (user kernels). Inputs are integer-valued so the expected results are exact.


def kernel_language(dev: Device) -> str | None:
    return getattr(dev, "kernel_language", None) or {"wgpu": "wgsl", "cuda": "cuda"}.get(dev.backend)


def kernel_source(name: str, language: str) -> str:
    ext = {"wgsl": "wgsl", "cuda": "cu"}[language]
    return resources.files("kiln").joinpath("kernels", language, f"{name}.{ext}").read_text()


def _kernel(dev: Device, name: str, **constants: int):
    if type(dev).compile is Device.compile:
        raise _Skip(f"backend '{dev.backend}' does not compile user kernels")
    language = kernel_language(dev)
    if language is None:
        raise _Skip(f"backend '{dev.backend}' has no kernel language for user kernels")
    try:
        return dev.compile(name, kernel_source(name, language), **constants)
    except UnsupportedOp as e:
        raise _Skip(str(e)) from None


def _launch(dev: Device, kernel, grid, buffers, params, block) -> None:
    try:
        dev.launch(kernel, grid, buffers, params=params, block=block)
    except UnsupportedOp as e:
        raise _Skip(str(e)) from None


def _groups(n: int, size: int) -> int:
    return -(-n // size)


def _basic_inputs(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(-1000, 1000, n).astype(np.float32), rng.integers(-1000, 1000, n).astype(np.float32))


def _run_thread_id(dev, s: _Scope, *, n: int, wg: int) -> dict:
    kernel = _kernel(dev, "basic_thread_id", WG=wg)
    _launch(dev, kernel, (_groups(n, wg), 1, 1), [s.output("out", (n,), "u32")], [n], (wg, 1, 1))
    return {}


def _expect_thread_id(seed, *, n: int, wg: int) -> dict:
    return {"out": np.arange(n, dtype=np.uint32)}


def _run_vector_add(dev, s: _Scope, *, n: int, wg: int) -> dict:
    a, b = _basic_inputs(s.seed, n)
    kernel = _kernel(dev, "basic_vector_add", WG=wg)
    _launch(dev, kernel, _groups(n, wg), [s.input(a), s.input(b), s.output("out", (n,))], [n], wg)
    return {}


def _expect_vector_add(seed, *, n: int, wg: int) -> dict:
    a, b = _basic_inputs(seed, n)
    return {"out": a + b}


def _run_scale(dev, s: _Scope, *, n: int, wg: int, scale: float) -> dict:
    x, _ = _basic_inputs(s.seed, n)
    kernel = _kernel(dev, "basic_scale", WG=wg)
    _launch(dev, kernel, _groups(n, wg), [s.input(x), s.output("out", (n,))], [scale, n], wg)
    return {}


def _expect_scale(seed, *, n: int, wg: int, scale: float) -> dict:
    return {"out": _basic_inputs(seed, n)[0] * np.float32(scale)}


def _reduce_input(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, n).astype(np.uint32)


def _run_reduce_sum(dev, s: _Scope, *, n: int, wg: int) -> dict:
    kernel = _kernel(dev, "basic_reduce_sum", WG=wg)
    total = s.output("total", (1,), "u32", init=np.zeros(1, np.uint32))
    _launch(dev, kernel, _groups(n, wg), [s.input(_reduce_input(s.seed, n)), total], [n], wg)
    return {}


def _expect_reduce_sum(seed, *, n: int, wg: int) -> dict:
    return {"total": np.array([_reduce_input(seed, n).sum()], np.uint32)}


def _matmul_inputs(seed: int, M: int, N: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(-4, 5, (M, K)).astype(np.float32), rng.integers(-4, 5, (K, N)).astype(np.float32))


def _run_matmul_2d(dev, s: _Scope, *, M: int, N: int, K: int, tile: int) -> dict:
    a, b = _matmul_inputs(s.seed, M, N, K)
    kernel = _kernel(dev, "basic_matmul_2d", TILE=tile)
    grid = (_groups(N, tile), _groups(M, tile), 1)
    params = [M, N, K]
    _launch(dev, kernel, grid, [s.input(a), s.input(b), s.output("out", (M, N))], params, (tile, tile, 1))
    return {}


def _expect_matmul_2d(seed, *, M: int, N: int, K: int, tile: int) -> dict:
    a, b = _matmul_inputs(seed, M, N, K)
    return {"out": a @ b}


def _run_inplace(dev, s: _Scope, *, n: int, wg: int) -> dict:
    x = s.output("out", (n,), init=_basic_inputs(s.seed, n)[0])
    kernel = _kernel(dev, "basic_inplace", WG=wg)
    for _ in range(2):
        _launch(dev, kernel, _groups(n, wg), [x], [n], wg)
    return {}


def _expect_inplace(seed, *, n: int, wg: int) -> dict:
    return {"out": _basic_inputs(seed, n)[0] * 4 + 3}


# ---------------------------------------------------------------------------------------------------------------
# The grid

BASIC_KERNELS = (
    "basic_thread_id",
    "basic_vector_add",
    "basic_scale",
    "basic_reduce_sum",
    "basic_matmul_2d",
    "basic_inplace",
)


def _k(qtype: GGMLQuantizationType, n32: int, n256: int) -> int:
    """A legal row length: a multiple of the block (256 for K-quants; 32 otherwise, floats included)."""
    return 256 * n256 if GGML_QUANT_SIZES[qtype][0] == 256 else 32 * n32


def cases(quick: bool = False, ops: Sequence[str] | None = None) -> list[Case]:
    """The case list. The quick grid keeps every op, format and edge (odd N and T, T=1 and T>1, non-multiples of
    block and workgroup sizes, GQA, decode/prefill) at small sizes; the full grid adds large shapes."""
    out: list[Case] = []

    def add(op, name, dtype, dtypes, run, full_only=False, expect=None, **params):
        out.append(Case(op, name, dtype, dtypes, run, params, quick=not full_only, expect=expect))

    formats = [t.name for t in quant.SUPPORTED]
    for f in formats:
        qt = Q[f]
        k_small, k_mid, k_big = _k(qt, 13, 3), _k(qt, 89, 11), _k(qt, 128, 16)
        for vocab, d, ids, full_only in (
            (67, k_small, [0, 66, 3, 3, 40], False),  # first and last rows, a repeat
            (35, k_small, [34], False),
            (4099, k_big, [4098, 0, 17, 2048, 4098, 1, 3000], True),
        ):
            name = f"T={len(ids)} V={vocab} d={d}"
            add("embed", name, f, (f,), _run_embed, full_only, qtype=f, vocab=vocab, d=d, ids=ids)
        for T, N, K, bias, full_only in (
            (1, 67, k_small, False, False),
            (5, 67, k_small, False, False),
            (3, 35, k_small, True, False),
            (1, 1, k_mid, False, True),
            (1, 4099, k_big, False, True),
            (7, 4099, k_big, False, True),
            (67, 515, k_mid, False, True),
        ):
            name = f"T={T} N={N} K={K}" + (" +bias" if bias else "")
            add("matmul", name, f, (f,), _run_matmul, full_only, qtype=f, T=T, N=N, K=K, bias=bias)

    # scale 3e-3: mean(x^2) ~ eps, so a kernel that drops or misplaces eps fails.
    for f, T, d, eps, scale, inplace, full_only in (
        ("F32", 1, 576, 1e-5, 3.0, False, False),
        ("F32", 5, 1003, 1e-6, 3.0, False, False),
        ("F32", 1, 576, 1e-5, 3.0, True, False),
        ("F16", 3, 256, 1e-5, 3.0, False, False),
        ("F32", 2, 576, 1e-5, 3e-3, False, False),
        ("F32", 7, 4096, 1e-5, 3.0, False, True),
        ("F32", 67, 2048, 1e-6, 3.0, True, True),
        ("F32", 1, 8192, 1e-5, 3.0, True, True),
    ):
        name = f"T={T} d={d} eps={eps:g}" + (" in-place" if inplace else "") + (" tiny-x" if scale < 1 else "")
        add(
            "rms_norm",
            name,
            f,
            (f,),
            _run_rms_norm,
            full_only,
            qtype=f,
            T=T,
            d=d,
            eps=eps,
            inplace=inplace,
            scale=scale,
        )

    def add_rope(label: str, rope: Rope, T: int, start: int, H: int, hd: int, full_only: bool) -> None:
        name = f"{'neox' if rope.neox else 'normal'} {label} T={T} pos={start} H={H} hd={hd}"
        add("rope", name, "f32", ("f32",), _run_rope, full_only, T=T, start=start, n_heads=H, head_dim=hd, rope=rope)

    for neox in (False, True):
        for theta in (1e4, 1e5):
            for T, start, H, hd, full_only in (
                (1, 1000, 4, 64, False),
                (5, 3, 3, 128, False),
                (67, 0, 32, 128, True),
                (1, 4095, 8, 64, True),
                (33, 100, 9, 64, True),
            ):
                add_rope(f"theta={theta:g}", Rope(theta, neox), T, start, H, hd, full_only)
        # scaled ropes matter at long positions; past ~4096 f32 angles (the usual GPU way, THRESHOLDS) drift too far
        for T, start, H, hd, full_only in ((1, 4000, 4, 64, False), (5, 2185, 3, 128, False), (33, 3000, 8, 128, True)):
            for label, rope in _scaled_ropes(hd, neox):
                add_rope(label, rope, T, start, H, hd, full_only)

    quick_heads = ((4, 4, 64), (9, 3, 64), (8, 2, 128))
    # (start, new tokens) per sequence: prefill chunks, decode rows, block boundaries (16), mixed batches
    scenarios = (
        ("prefill", ((0, 5),), 0, False),
        ("prefill after 11", ((11, 7),), 0, False),
        ("decode", ((300, 1),), 0, False),
        ("decode x5 at block edges", ((0, 1), (15, 1), (16, 1), (31, 1), (100, 1)), 0, False),
        ("mixed decode + chunks", ((5, 1), (0, 17), (40, 1), (31, 2)), 0, False),
        ("shared prefix", ((40, 1), (37, 5)), 2, False),
        ("prefill 67", ((0, 67),), 0, True),
        ("chunk 33 after 100", ((100, 33),), 0, True),
        ("decode at 4000", ((4000, 1),), 0, True),
        ("long and short decode", ((4000, 1), (0, 1), (2, 1), (700, 1)), 0, True),
        ("decode x33", tuple((7 * i + i * i, 1) for i in range(33)), 0, True),
        ("mixed 3 chunks + 8 decodes", ((0, 40), (64, 9), (200, 31)) + tuple((50 * i, 1) for i in range(8)), 0, True),
    )
    for heads in (*quick_heads, (14, 2, 64), (32, 8, 128)):
        for label, seqs, shared, big in scenarios:
            for block_size in (16, 32) if label.startswith("mixed") else (16,):
                name = f"{label} B={block_size} Hq={heads[0]} Hkv={heads[1]} hd={heads[2]}"
                add(
                    "attention",
                    name,
                    "kv",
                    ("kv",),
                    _run_attention,
                    big or heads not in quick_heads,
                    seqs=seqs,
                    n_heads=heads[0],
                    n_kv_heads=heads[1],
                    head_dim=heads[2],
                    block_size=block_size,
                    shared=shared,
                )

    for op, run in (("swiglu", _run_swiglu), ("add", _run_add)):
        for T, n, inplace, full_only in (
            (1, 1536, False, False),
            (5, 1001, True, False),
            (1, 1, False, False),
            (7, 11008, False, True),
            (67, 4099, True, True),
        ):
            name = f"T={T} n={n}" + (" in-place" if inplace else "")
            add(op, name, "f32", ("f32",), run, full_only, T=T, n=n, inplace=inplace)

    for T, d, rows, full_only in (
        ((5, 576, (4,), False)),
        ((7, 1001, (0, 6, 3), False)),
        ((1, 67, (0,), False)),
        ((67, 4096, tuple(range(0, 67, 3)), True)),
        ((64, 2048, tuple(range(63, -1, -1)), True)),
    ):
        name = f"T={T} d={d} rows={len(rows)}"
        add("gather_rows", name, "f32", ("f32",), _run_gather_rows, full_only, T=T, d=d, rows=rows)

    for n, at, negative, full_only in (
        (7, 6, False, False),
        (4099, 0, True, False),
        (49152, 31337, False, False),
        (151936, 151935, False, True),
        (32000, 16001, True, True),
        (128256, 65536, False, True),
    ):
        name = f"n={n} max@{at}" + (" all<0" if negative else "")
        add("argmax", name, "f32", ("f32",), _run_argmax, full_only, n=n, at=at, negative=negative)

    basic = (
        ("thread_id n=1000", "u32", _run_thread_id, _expect_thread_id, {"n": 1000, "wg": 64}),
        ("vector_add n=100003", "f32", _run_vector_add, _expect_vector_add, {"n": 100003, "wg": 64}),
        ("scale n=4099 s=2.5", "f32", _run_scale, _expect_scale, {"n": 4099, "wg": 64, "scale": 2.5}),
        ("reduce_sum n=100000 (shared+atomic)", "u32", _run_reduce_sum, _expect_reduce_sum, {"n": 100000, "wg": 256}),
        ("matmul_2d M=67 N=45 K=83", "f32", _run_matmul_2d, _expect_matmul_2d, {"M": 67, "N": 45, "K": 83, "tile": 16}),
        ("inplace n=1003 x2", "f32", _run_inplace, _expect_inplace, {"n": 1003, "wg": 64}),
    )
    for name, dtype, run, expect, params in basic:
        add("basic", name, dtype, (), run, expect=expect, **params)

    order = {op: i for i, op in enumerate((*MODEL_OPS, "basic"))}
    selected = [c for c in out if (not quick or c.quick) and (ops is None or c.op in ops)]
    return sorted(selected, key=lambda c: order[c.op])  # stable: grid order within an op


# ---------------------------------------------------------------------------------------------------------------
# Running and comparing


def _compare(
    got: dict[str, np.ndarray],
    want: dict[str, np.ndarray],
    thresholds: dict[str, tuple[float, float] | None],
    default: tuple[float, float],
) -> tuple[float, float, list[str]]:
    """Worst NMSE and max error over the outputs, and a message per output that fails."""
    worst_nmse, worst_max, problems = 0.0, 0.0, []
    for key, b in want.items():
        a = got.get(key)
        if a is None or np.shape(a) != np.shape(b):
            problems.append(f"{key}: shape {None if a is None else np.shape(a)} != expected {np.shape(b)}")
            worst_nmse = worst_max = math.inf
            continue
        nmse_limit, max_limit = thresholds.get(key) or default
        a, b = np.asarray(a).reshape(np.shape(b)), np.asarray(b)
        if nmse_limit == 0.0 or not np.issubdtype(b.dtype, np.floating):
            wrong = np.flatnonzero(a.reshape(-1) != b.reshape(-1))
            if wrong.size:
                i = wrong[0]
                problems.append(
                    f"{key}: {wrong.size} of {b.size} differ (first at flat index {i}: {a.flat[i]} != {b.flat[i]})"
                )
                worst_nmse = worst_max = math.inf
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(a64))
        if bad.size:
            problems.append(f"{key}: {bad.size} NaN/Inf (first at flat index {bad[0]})")
            worst_nmse = worst_max = math.inf
            continue
        if not np.all(np.isfinite(b64)):
            raise AssertionError(f"reference output {key} is not finite: a conformance case is wrong")
        diff = a64 - b64
        err, power = float(np.sum(diff * diff)), float(np.sum(b64 * b64))
        nmse = err / power if power > 0 else err
        max_err = float(np.max(np.abs(diff))) / math.sqrt(power / b.size) if power > 0 else math.sqrt(err)
        worst_nmse, worst_max = max(worst_nmse, nmse), max(worst_max, max_err)
        if nmse > nmse_limit:
            problems.append(f"{key}: NMSE {nmse:.3g} > {nmse_limit:.0e}")
        elif max_err > max_limit:
            i = int(np.argmax(np.abs(diff)))
            where = tuple(int(x) for x in np.unravel_index(i, b.shape))
            problems.append(
                f"{key}: element {where} is {a64.flat[i]:.6g}, expected {b64.flat[i]:.6g} "
                f"(error {max_err:.3g} x rms > {max_limit:.2g})"
            )
    return worst_nmse, worst_max, problems


def _execute(dev: Device, case: Case, kv_dtype: str) -> tuple[dict, dict, list[str]]:
    """Run the case on one device: outputs, per-output thresholds, guard problems. Frees all it allocated."""
    s = _Scope(dev, case.seed)
    params = dict(case.params, kv_dtype=kv_dtype) if case.op == "attention" else case.params
    try:
        with np.errstate(all="ignore"):  # the swiglu case overflows exp() on purpose
            extra = case.run(dev, s, **params)
            outs, thresholds, problems = s.read()
        outs.update(extra)
        return outs, thresholds, problems
    finally:
        s.close()


def _resolve(dtypes: Sequence[str], dev: Device) -> tuple[str, ...]:
    return tuple(dev.kv_dtype if d == "kv" else d for d in dtypes)


_HELD_KEYS = ("bytes_in_use", "weight_bytes", "weight_cache_bytes")  # memory_stats entries that must not grow


def _held(dev: Device) -> dict[str, int]:
    _settle(dev)
    try:
        stats = dev.memory_stats()
    except Exception:
        return {}
    return {k: stats[k] for k in _HELD_KEYS if isinstance(stats.get(k), int)}


def _leak(dev: Device, case: Case, before: dict[str, int]) -> str:
    """Growth is a leak only if a second run of the same case grows memory again: backends may keep scratch
    buffers for a shape they have seen, which is what makes the decode loop allocation-free."""
    after = _held(dev)
    if all(after.get(k, v) <= v for k, v in before.items()):
        return ""
    try:
        _execute(dev, case, dev.kv_dtype)
    except Exception as e:
        return f"memory grew, and a second run raised {type(e).__name__}: {e}"
    again = _held(dev)
    grown = {k: again[k] - after[k] for k in after if again.get(k, 0) > after[k]}
    return ", ".join(f"leaked {n} bytes of {k} per run" for k, n in grown.items())


def run_case(device: Device, case: Case, reference: Device | None = None) -> CaseResult:
    """One case on `device`, compared with `reference` (a NumpyDevice; made here if None). Never raises."""
    dtype = _resolve((case.dtype,), device)[0]
    threshold = THRESHOLDS[case.op]
    result = CaseResult(case.op, case.name, dtype, "fail", threshold=threshold[0])
    t0 = time.perf_counter()
    dtypes = _resolve(case.dtypes, device)
    if case.op != "basic" and not device.supports_op(case.op, dtypes):
        result.status = "skip"
        result.message = f"backend '{device.backend}' does not support {case.op}({', '.join(dtypes)})"
        return result
    before = _held(device)
    try:
        got, thresholds, problems = _execute(device, case, device.kv_dtype)
    except _Skip as e:
        result.status, result.message = "skip", str(e)
        return result
    except Exception as e:  # a kernel that raises is a failure of this case only
        result.message = f"{type(e).__name__}: {e}".strip()
        result.seconds = time.perf_counter() - t0
        _settle(device)
        return result
    try:
        if case.expect is not None:
            want = case.expect(case.seed, **case.params)
        else:
            own = reference is None
            if own:
                from .runtime.numpy_backend import NumpyDevice

                reference = NumpyDevice()
            try:
                want, _, ref_problems = _execute(reference, case, device.kv_dtype)
            finally:
                if own:
                    reference.close()
            if ref_problems:
                raise AssertionError(f"reference run broke its guards: {ref_problems}")
        nmse, max_err, mismatches = _compare(got, want, thresholds, threshold)
    except Exception as e:
        result.message = f"conformance suite error: {type(e).__name__}: {e}"
        result.seconds = time.perf_counter() - t0
        return result
    leak = _leak(device, case, before)
    if leak:
        problems.append(leak)
    result.nmse, result.max_err = nmse, max_err
    result.status = "fail" if problems or mismatches else "pass"
    result.message = "; ".join(mismatches + problems)
    result.seconds = time.perf_counter() - t0
    return result


def _settle(device: Device) -> None:
    try:
        device.sync()
    except Exception:
        pass


def run_suite(
    device: Device,
    ops: list[str] | None = None,
    quick: bool = False,
    on_result: Callable[[CaseResult], Any] | None = None,
) -> list[CaseResult]:
    """Every case (quick: the reduced grid) for `ops` (default: all model ops plus "basic") on `device`."""
    from .runtime.numpy_backend import NumpyDevice

    unknown = set(ops or ()) - {*MODEL_OPS, "basic"}
    if unknown:
        raise ValueError(f"unknown conformance ops {sorted(unknown)}; choose from {[*MODEL_OPS, 'basic']}")
    reference = NumpyDevice()
    results = []
    try:
        for case in cases(quick=quick, ops=ops):
            result = run_case(device, case, reference)
            results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        reference.close()
    return results


def summary(results: Sequence[CaseResult]) -> str:
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    return f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped"


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.1e}" if math.isfinite(x) else str(x)


def format_table(results: Sequence[CaseResult]) -> str:
    """Aligned columns: op, case, dtype, status (FAIL in capitals), NMSE, threshold, max error, seconds, message."""
    header = ("op", "case", "dtype", "status", "nmse", "threshold", "max_err", "sec", "message")
    rows = [
        (
            r.op,
            r.case,
            r.dtype,
            r.status.upper() if r.status == "fail" else r.status,
            _num(r.nmse),
            _num(r.threshold),
            _num(r.max_err),
            f"{r.seconds:.2f}",
            r.message,
        )
        for r in results
    ]
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header) - 1)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)) + "  " + row[-1] for row in (header, *rows)]
    return "\n".join(line.rstrip() for line in lines)
