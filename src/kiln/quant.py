"""GGUF tensor block formats: sizes, vectorised NumPy dequantization, random test weights.

Every format stores a row as a run of fixed-size blocks; dequantization views the raw bytes as
(n_blocks, block_bytes), slices out each field for all blocks at once, and writes float32 output.
Results match ``gguf.quants.dequantize`` bit for bit: the arithmetic is float32 in the same order
(e.g. Q4_K is ``(d * sc) * q - (dmin * m)``), which matters because the conformance tests compare
kernels against this module.

Layouts follow ggml (ggml-common.h); QK_K = 256 elements per K-quant super-block.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = [
    "SUPPORTED",
    "UnsupportedQuantType",
    "bits_per_weight",
    "bytes_per_element",
    "check_supported",
    "dequantize",
    "quantize_q8_0",
    "random_weight",
    "row_bytes",
]

Q = GGMLQuantizationType

SUPPORTED: tuple[GGMLQuantizationType, ...] = (
    Q.F32,
    Q.F16,
    Q.BF16,
    Q.Q8_0,
    Q.Q4_0,
    Q.Q4_1,
    Q.Q5_0,
    Q.Q5_1,
    Q.Q4_K,
    Q.Q5_K,
    Q.Q6_K,
)


class UnsupportedQuantType(ValueError):
    """A tensor uses a GGML type kiln cannot dequantize."""

    def __init__(self, qtype: object):
        name = qtype.name if isinstance(qtype, GGMLQuantizationType) else repr(qtype)
        self.qtype = qtype
        super().__init__(
            f"unsupported GGML quantization type {name}; supported: {', '.join(t.name for t in SUPPORTED)}"
        )


def _as_qtype(qtype: GGMLQuantizationType | int) -> GGMLQuantizationType:
    """Accept the enum or its integer value (as read from a GGUF header)."""
    if isinstance(qtype, GGMLQuantizationType):
        return qtype
    try:
        return GGMLQuantizationType(qtype)
    except ValueError:
        raise UnsupportedQuantType(qtype) from None


def check_supported(qtype: GGMLQuantizationType | int) -> None:
    """Raise UnsupportedQuantType unless ``qtype`` can be dequantized here."""
    if _as_qtype(qtype) not in SUPPORTED:
        raise UnsupportedQuantType(qtype)


def row_bytes(qtype: GGMLQuantizationType | int, n_cols: int) -> int:
    """Bytes of one row of ``n_cols`` elements.

    Works for any type gguf knows the block size of (not only SUPPORTED), so a loader can compute
    offsets of tensors it will later reject.
    """
    qt = _as_qtype(qtype)
    if qt not in GGML_QUANT_SIZES:
        raise UnsupportedQuantType(qt)
    block, size = GGML_QUANT_SIZES[qt]
    if n_cols <= 0 or n_cols % block:
        raise ValueError(
            f"{qt.name} rows must hold a positive multiple of {block} elements (its block size), got {n_cols}"
        )
    return n_cols // block * size


def bytes_per_element(qtype: GGMLQuantizationType | int) -> float:
    """Storage cost per weight in bytes, scale fields included (Q4_K: 0.5625)."""
    qt = _as_qtype(qtype)
    if qt not in GGML_QUANT_SIZES:
        raise UnsupportedQuantType(qt)
    block, size = GGML_QUANT_SIZES[qt]
    return size / block


def bits_per_weight(qtype: GGMLQuantizationType | int) -> float:
    """Storage cost per weight in bits (Q4_K: 4.5, Q8_0: 8.5)."""
    return 8.0 * bytes_per_element(qtype)


# ---------------------------------------------------------------------------------------------
# Block decoders. Each takes uint8 blocks of shape (n_blocks, block_bytes) and returns float32
# (n_blocks, block_elements). Fields are sliced column ranges of the block array, so every
# operation runs over all blocks at once.


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The f16 field at byte ``offset`` of every block, as float32 of shape (n_blocks, 1)."""
    return blocks[:, offset : offset + 2].view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Split bytes (..., L) into (..., 2, L) uint8: low nibbles first, then high nibbles.

    ggml packs element i of a 2L-run in the low nibble of byte i and element L+i in the high one.
    """
    out = np.empty((*qs.shape[:-1], 2, qs.shape[-1]), np.uint8)
    np.bitwise_and(qs, 0x0F, out=out[..., 0, :])
    np.right_shift(qs, 4, out=out[..., 1, :])
    return out


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Unpack packed bits (n, B) little-endian into (n, 8*B) uint8 0/1, bit k at index k."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _scaled(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    # Multiplying an integer array by float32 casts and scales in one pass; int -> f32 is exact.
    return np.multiply(q, d, dtype=np.float32)


def _dq_q8_0(b: np.ndarray) -> np.ndarray:
    # d:f16, qs:int8[32]
    return _scaled(b[:, 2:].view(np.int8), _f16(b, 0))


def _dq_q4_0(b: np.ndarray) -> np.ndarray:
    # d:f16, qs:u8[16]; value = d * (q - 8)
    q = _nibbles(b[:, 2:]).reshape(len(b), 32)
    q -= 8  # wraps in uint8; reinterpreted as int8 below
    return _scaled(q.view(np.int8), _f16(b, 0))


def _dq_q4_1(b: np.ndarray) -> np.ndarray:
    # d:f16, m:f16, qs:u8[16]; value = d * q + m
    out = _scaled(_nibbles(b[:, 4:]).reshape(len(b), 32), _f16(b, 0))
    out += _f16(b, 2)
    return out


def _q5(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """5-bit values of Q5_0/Q5_1: nibble | bit j of the 32-bit qh word << 4."""
    q = _nibbles(qs).reshape(len(qs), 32)
    q |= _high_bits(qh) << 4
    return q


def _dq_q5_0(b: np.ndarray) -> np.ndarray:
    # d:f16, qh:u32, qs:u8[16]; value = d * (q - 16)
    q = _q5(b[:, 2:6], b[:, 6:])
    q -= 16
    return _scaled(q.view(np.int8), _f16(b, 0))


def _dq_q5_1(b: np.ndarray) -> np.ndarray:
    # d:f16, m:f16, qh:u32, qs:u8[16]; value = d * q + m
    out = _scaled(_q5(b[:, 4:8], b[:, 8:]), _f16(b, 0))
    out += _f16(b, 2)
    return out


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte Q4_K/Q5_K field into eight 6-bit scales and eight 6-bit mins.

    Bytes 0-3 hold scales 0-3 (low 6 bits), bytes 4-7 mins 0-3; scales/mins 4-7 keep their low
    4 bits in bytes 8-11 (scale low nibble, min high nibble) and their top 2 bits in the spare
    top bits of bytes 0-3 / 4-7.
    """
    lo_s, lo_m, mix = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.empty((len(s), 8), np.uint8)
    mn = np.empty((len(s), 8), np.uint8)
    sc[:, :4] = lo_s & 0x3F
    mn[:, :4] = lo_m & 0x3F
    sc[:, 4:] = (mix & 0x0F) | ((lo_s >> 6) << 4)
    mn[:, 4:] = (mix >> 4) | ((lo_m >> 6) << 4)
    return sc, mn


def _k_affine(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(d * sc) * q - (dmin * m) for Q4_K/Q5_K; q is uint8 (n_blocks, 8, 32)."""
    sc, mn = _k_scales_mins(b[:, 4:16])
    out = _scaled(q, (_f16(b, 0) * sc)[:, :, None])
    out -= (_f16(b, 2) * mn)[:, :, None]
    return out.reshape(len(b), 256)


def _dq_q4_k(b: np.ndarray) -> np.ndarray:
    # d:f16, dmin:f16, scales:u8[12], qs:u8[128]. Each 32-byte run of qs holds two 32-element
    # sub-blocks: low nibbles then high nibbles.
    q = _nibbles(b[:, 16:].reshape(len(b), 4, 32)).reshape(len(b), 8, 32)
    return _k_affine(b, q)


def _dq_q5_k(b: np.ndarray) -> np.ndarray:
    # d:f16, dmin:f16, scales:u8[12], qh:u8[32], qs:u8[128]. Sub-block j's fifth bit is bit j of
    # qh[l] for element l.
    n = len(b)
    q = _nibbles(b[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    hb = _high_bits(b[:, 16:48]).reshape(n, 32, 8)  # [l, j]
    q |= hb.transpose(0, 2, 1) << 4
    return _k_affine(b, q)


def _dq_q6_k(b: np.ndarray) -> np.ndarray:
    # ql:u8[128], qh:u8[64], scales:i8[16], d:f16; value = d * sc * (q - 32), one scale per 16.
    # Each 128-element half uses 64 ql bytes (two 32-byte parts) and 32 qh bytes. Its four
    # 32-element quarters are: part0 low nibble, part1 low, part0 high, part1 high; quarter s
    # takes its top 2 bits from bits 2s..2s+1 of qh.
    n = len(b)
    q = _nibbles(b[:, :128].reshape(n, 2, 2, 32))  # [half, part, nibble, l]
    q = q.transpose(0, 1, 3, 2, 4).reshape(n, 2, 4, 32)  # [half, quarter = nibble*2 + part, l]
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    q |= ((qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3) << 4
    q -= 32
    dl = _f16(b, 208) * b[:, 192:208].view(np.int8)  # (n, 16) in output order
    return _scaled(q.view(np.int8).reshape(n, 16, 16), dl[:, :, None]).reshape(n, 256)


_BLOCK_DECODERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    Q.Q8_0: _dq_q8_0,
    Q.Q4_0: _dq_q4_0,
    Q.Q4_1: _dq_q4_1,
    Q.Q5_0: _dq_q5_0,
    Q.Q5_1: _dq_q5_1,
    Q.Q4_K: _dq_q4_k,
    Q.Q5_K: _dq_q5_k,
    Q.Q6_K: _dq_q6_k,
}


FLOATS: tuple[GGMLQuantizationType, ...] = (Q.F32, Q.F16, Q.BF16)  # plain values, no blocks or scales

# Byte offsets of each block's f16 scales (d, and dmin/m where the format has one), as ggml lays them out.
_SCALE_OFFSETS: dict[GGMLQuantizationType, tuple[int, ...]] = {
    Q.Q8_0: (0,),
    Q.Q4_0: (0,),
    Q.Q5_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_1: (0, 2),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}


def first_nonfinite(raw: np.ndarray, qtype: GGMLQuantizationType | int) -> int | None:
    """Index of the first NaN/Inf value (float formats) or block scale (quantized formats) in a tensor's bytes, or
    None. A NaN scale turns a whole block, and then every activation it touches, into NaN: garbage that loads."""
    qtype = _as_qtype(qtype)
    flat = raw.reshape(-1)
    if qtype in (Q.F32, Q.F16):
        values = flat.view(np.float32 if qtype == Q.F32 else np.float16)
        bad = ~np.isfinite(values)
    elif qtype == Q.BF16:
        bad = (flat.view(np.uint16) & 0x7F80) == 0x7F80  # exponent all ones: inf or NaN
    else:
        blocks = flat.reshape(-1, GGML_QUANT_SIZES[qtype][1])
        bad = np.zeros(len(blocks), bool)
        for off in _SCALE_OFFSETS[qtype]:
            bad |= ~np.isfinite(_f16(blocks, off).reshape(-1))
    hits = np.flatnonzero(bad)
    return int(hits[0]) if hits.size else None


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType | int, n_cols: int) -> np.ndarray:
    """Decode raw GGUF tensor bytes into a new float32 array of shape (rows, n_cols).

    ``raw`` is uint8 of shape (rows, row_bytes) or flat (any other dtype is reinterpreted as its
    bytes). The result never shares memory with ``raw``, so it is writable even when ``raw`` is a
    read-only memmap.
    """
    qt = _as_qtype(qtype)
    check_supported(qt)
    rb = row_bytes(qt, n_cols)
    raw = np.ascontiguousarray(raw)
    if raw.dtype != np.uint8:
        raw = raw.reshape(-1).view(np.uint8)
    if raw.size % rb:
        raise ValueError(
            f"{qt.name}: {raw.size} bytes is not a whole number of {n_cols}-element rows ({rb} bytes each)"
        )
    rows = raw.size // rb
    if qt == Q.F32:
        return raw.reshape(rows, rb).view(np.float32).copy()
    if qt == Q.F16:
        return raw.reshape(rows, rb).view(np.float16).astype(np.float32)
    if qt == Q.BF16:
        # bf16 is the top half of an f32.
        return np.left_shift(raw.reshape(rows, rb).view(np.uint16), 16, dtype=np.uint32).view(np.float32)
    size = GGML_QUANT_SIZES[qt][1]
    out = _BLOCK_DECODERS[qt](raw.reshape(-1, size))
    return out.reshape(rows, n_cols)


# ---------------------------------------------------------------------------------------------
# Q8_0 quantization (for tests and reference data).


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C roundf(): ties away from zero (np.rint rounds ties to even). Exact for |v| < 2**23."""
    a = np.abs(v)
    f = np.floor(a)
    return np.copysign(f + (a - f >= 0.5), v)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """Quantize float rows (rows, cols) to Q8_0 raw bytes (rows, cols // 32 * 34).

    Same as ggml's quantize_row_q8_0_ref: d = amax / 127 per block of 32, q = roundf(x / d) with
    the reciprocal taken from the unrounded f32 d, then d stored as f16. Bit-identical to it.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    rows, cols = x.shape
    rb = row_bytes(Q.Q8_0, cols)
    blocks = x.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    out = np.empty((len(blocks), 34), np.uint8)
    out[:, :2].view(np.float16)[:] = d.astype(np.float16)
    out[:, 2:].view(np.int8)[:] = _round_half_away(blocks * inv).astype(np.int8)
    return out.reshape(rows, rb)


# ---------------------------------------------------------------------------------------------
# Random weights for synthetic test/benchmark models.


def _uniform_moments(lo: int, hi: int) -> tuple[float, float]:
    """Mean and mean square of the uniform integer distribution on [lo, hi]."""
    n = hi - lo + 1
    mean = (lo + hi) / 2
    return mean, mean * mean + (n * n - 1) / 12


def _affine_k_unit_std(q_hi: int) -> float:
    """Std of sc*q - c*m for independent uniform sc, m in [0, 63], q in [0, q_hi], c = E[q].

    Setting dmin = c*d centres K-quant values overall; this is their spread at d = 1.
    """
    s1, s2 = _uniform_moments(0, 63)
    q1, q2 = _uniform_moments(0, q_hi)
    return float(np.sqrt(s2 * q2 - 2 * q1 * s1 * q1 * s1 + q1 * q1 * s2))


# Per type: (unit std of the dequantized values at d = 1, E[q] used to centre the min field).
# Random quant bytes make q uniform, so d = scale / unit_std gives values of std ~= scale.
_RANDOM_STATS: dict[GGMLQuantizationType, tuple[float, float]] = {
    Q.Q8_0: (np.sqrt(_uniform_moments(-128, 127)[1]), 0.0),
    Q.Q4_0: (np.sqrt(_uniform_moments(-8, 7)[1]), 0.0),
    Q.Q4_1: (np.sqrt((16 * 16 - 1) / 12), 7.5),
    Q.Q5_0: (np.sqrt(_uniform_moments(-16, 15)[1]), 0.0),
    Q.Q5_1: (np.sqrt((32 * 32 - 1) / 12), 15.5),
    Q.Q4_K: (_affine_k_unit_std(15), 7.5),
    Q.Q5_K: (_affine_k_unit_std(31), 15.5),
    # int8 sub-scales times q - 32 in [-32, 31], both uniform.
    Q.Q6_K: (np.sqrt(_uniform_moments(-128, 127)[1] * _uniform_moments(-32, 31)[1]), 0.0),
}

# Byte offsets of the f16 fields of each block: (scale d, min m / dmin or None).
_F16_FIELDS: dict[GGMLQuantizationType, tuple[int, int | None]] = {
    Q.Q8_0: (0, None),
    Q.Q4_0: (0, None),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0, None),
    Q.Q5_1: (0, 2),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208, None),
}


def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    # Full-range uint64 draws are raw generator output: ~8x faster than uint8 integers().
    return rng.integers(0, 2**64, size=-(-n // 8), dtype=np.uint64).view(np.uint8)[:n]


def random_weight(
    qtype: GGMLQuantizationType | int, rows: int, cols: int, rng: np.random.Generator, scale: float = 0.02
) -> np.ndarray:
    """Random raw tensor bytes (rows, row_bytes) whose dequantized values have std ~= ``scale``.

    Quantized types: uniformly random bytes, then every f16 scale field set to one fixed value
    (and min fields to the value that centres the block on zero), so values are finite and of
    sensible size whatever the random bits. K-quant sub-scales stay random. Float types: normal
    samples times ``scale``, rounded to the type.
    """
    qt = _as_qtype(qtype)
    check_supported(qt)
    rb = row_bytes(qt, cols)
    if qt in FLOATS:
        x = rng.standard_normal((rows, cols), dtype=np.float32)
        x *= np.float32(scale)
        if qt == Q.F32:
            return x.view(np.uint8)
        if qt == Q.F16:
            return x.astype(np.float16).view(np.uint8)
        # f32 -> bf16 round to nearest even (no NaN/inf can occur here).
        bits = x.view(np.uint32)
        bits += np.uint32(0x7FFF) + ((bits >> 16) & 1)
        return (bits >> 16).astype(np.uint16).view(np.uint8)

    out = _random_bytes(rng, rows * rb).reshape(rows, rb)
    blocks = out.reshape(-1, GGML_QUANT_SIZES[qt][1])
    unit_std, centre = _RANDOM_STATS[qt]
    d = np.float16(scale / unit_std)
    d_off, m_off = _F16_FIELDS[qt]
    blocks[:, d_off : d_off + 2].view(np.float16)[:] = d
    if m_off is not None:
        # Q4_1/Q5_1 add m; K-quants subtract dmin * m_sub.
        m = -np.float32(d) * centre if qt in (Q.Q4_1, Q.Q5_1) else np.float32(d) * centre
        blocks[:, m_off : m_off + 2].view(np.float16)[:] = np.float16(m)
    return out
