"""The reference backend: plain vectorised NumPy in float32. Every other backend is tested against this file.

Weights are dequantized to float32 once and cached while they fit a memory budget (KILN_NUMPY_CACHE_MB,
default: a quarter of RAM); beyond it they stay quantized and are dequantized per use, one matrix at a time,
so a 7B model runs in a few GB instead of 28 GB.
"""

from __future__ import annotations

import os

import numpy as np

from .. import quant
from .base import DTYPES, BufferPool, Device, Tensor, Weight

_ALL_TYPES = {t.name for t in quant.SUPPORTED}


def _default_cache_bytes() -> int:
    env = os.environ.get("KILN_NUMPY_CACHE_MB")
    if env:
        return int(env) << 20
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError):
        return 4 << 30


class NumpyDevice(Device):
    backend = "numpy"
    SUPPORTED_OPS = {
        "embed": _ALL_TYPES,
        "matmul": _ALL_TYPES | {"f32", "f16"},
        "rms_norm": {"F32", "F16", "f32", "f16"},
        "rope": {"f32", "f16"},
        "attention": {"f32", "f16"},
        "swiglu": {"f32", "f16"},
        "add": {"f32", "f16"},
        "gather_rows": {"f32", "f16", "i32"},
        "argmax": {"f32", "f16"},
    }

    def __init__(self, cache_bytes: int | None = None):
        super().__init__()
        self.name = "numpy (CPU reference)"
        self.cache_budget = _default_cache_bytes() if cache_bytes is None else cache_bytes
        self.cached_bytes = 0
        self.pool = BufferPool(lambda n: np.empty(n, np.uint8), lambda b: None)
        self._live: dict[int, tuple[np.ndarray, int]] = {}

    # --- memory -------------------------------------------------------------------------------------------------
    def empty(self, shape, dtype="f32") -> Tensor:
        nbytes = int(np.prod(shape)) * np.dtype(DTYPES[dtype]).itemsize
        raw, size = self.pool.take(nbytes)
        array = raw[:nbytes].view(DTYPES[dtype]).reshape(shape)
        tensor = Tensor(self, shape, dtype, array)
        self._live[id(tensor)] = (raw, size)
        return tensor

    def view(self, tensor: Tensor, offset: int, shape) -> Tensor:
        flat = tensor.storage.reshape(-1)
        return Tensor(self, shape, tensor.dtype, flat[offset : offset + int(np.prod(shape))].reshape(shape))

    def write(self, tensor: Tensor, array: np.ndarray) -> None:
        tensor.storage[...] = np.asarray(array).reshape(tensor.shape)

    def download(self, tensor: Tensor) -> np.ndarray:
        return tensor.storage.copy()

    def free(self, tensor: Tensor) -> None:
        raw, size = self._live.pop(id(tensor))
        self.pool.give(raw, size)
        tensor.storage = None

    def memory_stats(self) -> dict:
        return {**self.pool.stats(), "weight_cache_bytes": self.cached_bytes}

    def close(self) -> None:
        self.pool.clear()

    # --- weights ------------------------------------------------------------------------------------------------
    def load_weight(self, name, qtype, raw, shape) -> Weight:
        weight = Weight(name, qtype, tuple(shape))
        if len(shape) == 1:
            weight.storage = quant.dequantize(raw.reshape(1, -1).view(np.uint8), qtype, shape[0])[0]
            return weight
        weight.extra["raw"] = raw
        nbytes = shape[0] * shape[1] * 4
        if self.cached_bytes + nbytes <= self.cache_budget:
            weight.storage = quant.dequantize(raw, qtype, shape[1])
            self.cached_bytes += nbytes
        return weight

    def free_weight(self, weight: Weight) -> None:
        if weight.storage is not None and len(weight.shape) == 2:
            self.cached_bytes -= weight.storage.nbytes
        weight.storage = None
        weight.extra.clear()

    def dense(self, weight: Weight) -> np.ndarray:
        """The float32 matrix: cached, or dequantized now (and dropped after use) when over the budget."""
        if weight.storage is not None:
            return weight.storage
        return quant.dequantize(weight.extra["raw"], weight.qtype, weight.shape[1])

    # --- ops ----------------------------------------------------------------------------------------------------
    def embed(self, weight, ids, out) -> None:
        rows = ids.storage.astype(np.int64)
        if weight.storage is not None:
            out.storage[...] = weight.storage[rows]
        else:
            out.storage[...] = quant.dequantize(weight.extra["raw"][rows], weight.qtype, weight.shape[1])

    def rms_norm(self, x, weight, eps, out) -> None:
        xf = x.storage.astype(np.float32, copy=False)
        scale = 1.0 / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + np.float32(eps))
        out.storage[...] = xf * scale * weight.storage

    def matmul(self, x, weight, out, bias=None) -> None:
        result = x.storage.astype(np.float32, copy=False) @ self.dense(weight).T
        if bias is not None:
            result += bias.storage
        out.storage[...] = result

    def rope(self, x, pos, n_heads, head_dim, rope) -> None:
        T = x.shape[0]
        xs = x.storage.reshape(T, n_heads, head_dim)
        cos, sin = rope.cos_sin(pos.storage, head_dim)
        cos, sin = cos[:, None, :], sin[:, None, :]
        if rope.neox:
            a, b = xs[..., : head_dim // 2].copy(), xs[..., head_dim // 2 :].copy()
            xs[..., : head_dim // 2] = a * cos - b * sin
            xs[..., head_dim // 2 :] = a * sin + b * cos
        else:
            a, b = xs[..., 0::2].copy(), xs[..., 1::2].copy()
            xs[..., 0::2] = a * cos - b * sin
            xs[..., 1::2] = a * sin + b * cos

    def attention(self, q, k, v, k_cache, v_cache, kv, out, n_heads, n_kv_heads, head_dim) -> None:
        T = q.shape[0]
        kc, vc = k_cache.storage, v_cache.storage  # [Hkv, slots, hd]
        slots = kv.slot.storage.astype(np.int64)
        kc[:, slots] = k.storage.reshape(T, n_kv_heads, head_dim).transpose(1, 0, 2)
        vc[:, slots] = v.storage.reshape(T, n_kv_heads, head_dim).transpose(1, 0, 2)
        positions, table, B = kv.pos.storage.astype(np.int64), kv.table.storage.astype(np.int64), kv.block_size
        qs = q.storage.reshape(T, n_heads, head_dim)
        for first, n, row in kv.runs:
            pos = positions[first : first + n]
            n_kv = int(pos.max()) + 1
            j = np.arange(n_kv)
            rows = table[row, j // B] * B + j % B  # the sequence's cache rows, position by position
            out.storage[first : first + n] = _attend(qs[first : first + n], kc[:, rows], vc[:, rows], pos, head_dim)

    def swiglu(self, gate, up, out) -> None:
        g = gate.storage.astype(np.float32, copy=False)
        out.storage[...] = g / (1.0 + np.exp(-g)) * up.storage

    def add(self, a, b, out) -> None:
        np.add(a.storage, b.storage, out=out.storage)

    def gather_rows(self, x, rows, out) -> None:
        out.storage[...] = x.storage[rows.storage.astype(np.int64)]


def _attend(q: np.ndarray, keys: np.ndarray, vals: np.ndarray, positions: np.ndarray, head_dim: int) -> np.ndarray:
    """Causal GQA attention of one sequence's tokens q [T, Hq, hd] at `positions` over its keys and values
    [Hkv, n_kv, hd] (position j at index j); returns [T, Hq * hd]."""
    T, n_heads, _ = q.shape
    n_kv_heads, n_kv = keys.shape[0], keys.shape[1]
    group = n_heads // n_kv_heads
    # q: [T, Hq, hd] -> [Hkv, group*T, hd] so each KV head serves its query heads in one batched matmul.
    qg = q.reshape(T, n_kv_heads, group, head_dim).transpose(1, 2, 0, 3).reshape(n_kv_heads, group * T, head_dim)
    keys = keys.astype(np.float32, copy=False)
    vals = vals.astype(np.float32, copy=False)
    scores = (qg @ keys.transpose(0, 2, 1)) * np.float32(1.0 / np.sqrt(head_dim))  # [Hkv, group*T, n_kv]
    scores = scores.reshape(n_kv_heads, group, T, n_kv)
    masked = np.arange(n_kv)[None, :] > positions[:, None]  # [T, n_kv] causal mask
    scores[..., masked] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    ctx = scores.reshape(n_kv_heads, group * T, n_kv) @ vals  # [Hkv, group*T, hd]
    return ctx.reshape(n_kv_heads, group, T, head_dim).transpose(2, 0, 1, 3).reshape(T, -1)
