"""kiln.quant against gguf's reference dequantizer: exact agreement on random blocks of every format."""

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from kiln.quant import (
    SUPPORTED,
    UnsupportedQuantType,
    bits_per_weight,
    bytes_per_element,
    check_supported,
    dequantize,
    quantize_q8_0,
    random_weight,
    row_bytes,
)

FLOATS = (Q.F32, Q.F16, Q.BF16)
QUANTS = tuple(t for t in SUPPORTED if t not in FLOATS)

# f16 scale/min fields per block, written out independently of kiln.quant (from ggml-common.h).
F16_OFFSETS = {
    Q.Q8_0: (0,),
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}

# Exponent-all-ones mask and the lowest exponent bit, per float encoding.
FLOAT_BITS = {Q.F32: (np.uint32, 0x7F800000, 0x00800000), Q.F16: (np.uint16, 0x7C00, 0x0400)}
FLOAT_BITS[Q.BF16] = (np.uint16, 0x7F80, 0x0080)


def _make_finite(bits: np.ndarray, mask: int, low: int) -> None:
    """Turn inf/NaN encodings finite in place by clearing one exponent bit."""
    bad = (bits & mask) == mask
    bits[bad] &= bits.dtype.type(~low & (2 ** (8 * bits.itemsize) - 1))


def random_bytes_finite(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Fully random tensor bytes, with every f16 scale field (or float element) forced finite."""
    raw = rng.integers(0, 256, size=(rows, row_bytes(qtype, cols)), dtype=np.uint8)
    if qtype in FLOATS:
        dtype, mask, low = FLOAT_BITS[qtype]
        _make_finite(raw.view(dtype), mask, low)
    else:
        blocks = raw.reshape(-1, GGML_QUANT_SIZES[qtype][1])
        for off in F16_OFFSETS[qtype]:
            field = blocks[:, off : off + 2].view(np.uint16)
            _make_finite(field, 0x7C00, 0x0400)
    return raw


def reference(raw: np.ndarray, qtype, cols: int) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(-1, cols)


def test_supported_list():
    assert len(SUPPORTED) == 11 and len(set(SUPPORTED)) == 11
    assert set(F16_OFFSETS) == set(QUANTS)


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 2, 5, 17])
def test_dequantize_matches_gguf(qtype, rows):
    rng = np.random.default_rng([int(qtype), rows])
    block = GGML_QUANT_SIZES[qtype][0]
    # 3 blocks per row: an odd count catches pairing mistakes between neighbouring blocks.
    cols = 3 * max(block, 256 if block == 1 else 32)
    for raw in (random_weight(qtype, rows, cols, rng), random_bytes_finite(qtype, rows, cols, rng)):
        got = dequantize(raw, qtype, cols)
        assert got.dtype == np.float32 and got.shape == (rows, cols)
        assert np.isfinite(got).all()
        np.testing.assert_array_equal(got, reference(raw, qtype, cols))


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_dequantize_input_forms(qtype):
    rng = np.random.default_rng(7)
    cols = 512
    raw = random_bytes_finite(qtype, 6, cols, rng)
    want = dequantize(raw, qtype, cols)
    np.testing.assert_array_equal(dequantize(raw.reshape(-1), qtype, cols), want)  # flat
    np.testing.assert_array_equal(dequantize(raw[::2], qtype, cols), want[::2])  # non-contiguous rows
    np.testing.assert_array_equal(dequantize(raw, int(qtype), cols), want)  # integer type id
    ro = raw.copy()
    ro.flags.writeable = False  # like a read-only memmap of the file
    got = dequantize(ro, qtype, cols)
    assert got.flags.writeable and not np.shares_memory(got, ro)
    assert dequantize(raw[:0], qtype, cols).shape == (0, cols)


def test_dequantize_float_dtype_input():
    x = np.arange(8, dtype=np.float32)
    np.testing.assert_array_equal(dequantize(x, Q.F32, 4), x.reshape(2, 4))


def test_dequantize_bad_sizes():
    with pytest.raises(ValueError, match="multiple of 32"):
        dequantize(np.zeros(34, np.uint8), Q.Q8_0, 48)
    with pytest.raises(ValueError, match="whole number"):
        dequantize(np.zeros(35, np.uint8), Q.Q8_0, 32)


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_row_bytes_and_bpw(qtype):
    block, size = GGML_QUANT_SIZES[qtype]
    for n_blocks in (1, 3, 16):
        assert row_bytes(qtype, n_blocks * block) == n_blocks * size
    assert bytes_per_element(qtype) == size / block
    assert bits_per_weight(qtype) == 8 * size / block
    if block > 1:
        with pytest.raises(ValueError, match=f"{qtype.name}.*multiple of {block}"):
            row_bytes(qtype, block + 1)


def test_bits_per_weight_known_values():
    assert bits_per_weight(Q.Q4_K) == 4.5
    assert bits_per_weight(Q.Q8_0) == 8.5
    assert bits_per_weight(Q.Q6_K) == 6.5625


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.IQ4_NL, Q.IQ2_XXS, Q.TQ1_0])
def test_unsupported_types(qtype):
    for call in (
        lambda: check_supported(qtype),
        lambda: dequantize(np.zeros(row_bytes(qtype, 256), np.uint8), qtype, 256),
        lambda: random_weight(qtype, 1, 256, np.random.default_rng(0)),
    ):
        with pytest.raises(UnsupportedQuantType, match=qtype.name) as exc:
            call()
        assert "Q4_K" in str(exc.value)  # lists what is supported
        assert isinstance(exc.value, ValueError)


def test_unknown_type_id():
    with pytest.raises(UnsupportedQuantType, match="999"):
        check_supported(999)


def test_check_supported_accepts_supported():
    for qtype in SUPPORTED:
        check_supported(qtype)
        check_supported(int(qtype))


def test_quantize_q8_0_matches_gguf_and_round_trips():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 320)).astype(np.float32) * rng.uniform(0.01, 10, size=(7, 1)).astype(np.float32)
    x[0, :32] = 0.0  # all-zero block: d = 0
    x[1, :32] = (np.arange(32) - 15.5) * (127 / 15.5)  # exact .5 ties after scaling
    q = quantize_q8_0(x)
    assert q.dtype == np.uint8 and q.shape == (7, row_bytes(Q.Q8_0, 320))
    np.testing.assert_array_equal(q, gguf.quants.quantize(x, Q.Q8_0))
    y = dequantize(q, Q.Q8_0, 320)
    amax = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
    # Half a step of d = amax/127, plus the f16 rounding of d (rel. 2**-11) times |q| <= 127.
    bound = amax / 127 * 0.5 + amax * 2.0**-11 + 1e-12
    assert (np.abs(y - x).reshape(-1, 32) <= bound).all()
    np.testing.assert_array_equal(y[0, :32], 0.0)


def test_quantize_q8_0_1d_and_bad_cols():
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    assert quantize_q8_0(x).shape == (1, 68)
    with pytest.raises(ValueError):
        quantize_q8_0(np.zeros((2, 40), np.float32))


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
@pytest.mark.parametrize("scale", [0.02, 1.0])
def test_random_weight_statistics(qtype, scale):
    rng = np.random.default_rng(11)
    raw = random_weight(qtype, 64, 1024, rng, scale=scale)
    assert raw.dtype == np.uint8 and raw.shape == (64, row_bytes(qtype, 1024))
    w = dequantize(raw, qtype, 1024)
    assert np.isfinite(w).all()
    assert 0.8 * scale < w.std() < 1.25 * scale
    assert abs(w.mean()) < 0.2 * scale


def test_random_weight_deterministic():
    a = random_weight(Q.Q4_K, 3, 512, np.random.default_rng(5))
    b = random_weight(Q.Q4_K, 3, 512, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
