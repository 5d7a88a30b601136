"""The conformance suite on every backend available here, one test per case, and proof that it can fail.

numpy runs against itself (trivially passing: the point is that every case builds, runs and frees what it
allocates); wgpu runs the quick grid (CI has lavapipe, a slow CPU Vulkan); cuda the full grid. Broken NumpyDevice
subclasses must make the suite fail, and correct-but-different GPU-style arithmetic must not.
"""

from __future__ import annotations

import numpy as np
import pytest

from kiln import conformance, quant
from kiln.errors import KilnError
from kiln.runtime import get_device
from kiln.runtime.numpy_backend import NumpyDevice

GRIDS = {
    "numpy": conformance.cases(quick=False),
    "wgpu": conformance.cases(quick=True),
    "cuda": conformance.cases(quick=False),
}
PARAMS = [
    pytest.param(
        backend,
        case,
        id=f"{backend}-{case.id}",
        marks=[pytest.mark.slow] if backend == "numpy" and not case.quick else [],
    )
    for backend, grid in GRIDS.items()
    for case in grid
]


@pytest.fixture(scope="session")
def devices():
    """backend name -> Device, opened once; pytest.skip with the reason where the backend is unavailable."""
    opened: dict[str, object] = {}

    def get(name: str):
        if name not in opened:
            try:
                opened[name] = get_device(name, quiet=True)
            except (KilnError, ImportError) as e:
                opened[name] = e
        dev = opened[name]
        if isinstance(dev, Exception):
            pytest.skip(f"backend {name} unavailable: {dev}")
        return dev

    yield get
    for dev in opened.values():
        if not isinstance(dev, Exception):
            dev.close()


@pytest.fixture(scope="session")
def reference():
    ref = NumpyDevice()
    yield ref
    ref.close()


@pytest.mark.parametrize("backend,case", PARAMS)
def test_case(devices, reference, backend, case):
    dev = devices(backend)
    r = conformance.run_case(dev, case, reference)
    if r.status == "skip":
        pytest.skip(r.message)
    assert r.status == "pass", f"{dev.name}: {r.op} {r.case} [{r.dtype}]: {r.message}"


def test_grid_covers_every_op_and_format():
    from kiln.runtime.base import MODEL_OPS

    for quick in (True, False):
        grid = conformance.cases(quick=quick)
        assert {c.op for c in grid} == {*MODEL_OPS, "basic"}
        for op in ("matmul", "embed"):
            assert {c.dtype for c in grid if c.op == op} == {t.name for t in quant.SUPPORTED}
        assert len({c.id for c in grid}) == len(grid), "case ids must be unique"
    full = conformance.cases()
    assert any(c.params.get("N") == 4099 for c in full if c.op == "matmul")
    ropes = [c.params["rope"] for c in conformance.cases(quick=True) if c.op == "rope"]
    assert {r.neox for r in ropes} == {False, True} and {1e4, 1e5} <= {r.theta for r in ropes}
    assert {r.kind for r in ropes} == {"none", "llama3", "linear", "yarn", "llama3+yarn"}


def test_suite_on_numpy_frees_everything():
    dev = NumpyDevice()
    results = conformance.run_suite(dev, quick=True)
    assert conformance.summary(results) == f"{len(results) - 6} passed, 0 failed, 6 skipped"
    assert {r.op for r in results if r.status == "skip"} == {"basic"}  # numpy has no user kernels
    stats = dev.memory_stats()
    assert stats["bytes_in_use"] == 0 and stats["weight_cache_bytes"] == 0


def test_table_and_summary():
    results = conformance.run_suite(NumpyDevice(), ops=["add", "argmax"], quick=True)
    table = conformance.format_table(results)
    lines = table.splitlines()
    assert lines[0].split()[:6] == ["op", "case", "dtype", "status", "nmse", "threshold"]
    assert len(lines) == len(results) + 1 and all(" pass " in line for line in lines[1:])
    with pytest.raises(ValueError, match="unknown conformance ops"):
        conformance.run_suite(NumpyDevice(), ops=["matmul_q"])


# --- negative controls: a broken backend must fail ---------------------------------------------------------------


class Broken(NumpyDevice):
    """NumpyDevice with one injected fault."""

    def __init__(self, fault: str):
        super().__init__()
        self.fault = fault

    def matmul(self, x, weight, out, bias=None):
        super().matmul(x, weight, out, bias)
        if self.fault == "matmul_zero_row":
            out.storage[0] = 0
        if self.fault == "matmul_last_col":  # the classic bug: the last, partial tile of N is skipped
            out.storage[:, -1] = 0

    def add(self, a, b, out):
        super().add(a, b, out)
        if self.fault == "add_oob":
            flat = out.storage.reshape(-1)
            np.lib.stride_tricks.as_strided(flat, (flat.size + 1,), flat.strides)[-1] = 1.0

    def swiglu(self, gate, up, out):
        super().swiglu(gate, up, out)
        if self.fault == "swiglu_nan":
            out.storage.reshape(-1)[-1] = np.nan

    def rms_norm(self, x, weight, eps, out):
        if self.fault != "rms_norm_noop":
            super().rms_norm(x, weight, 0.0 if self.fault == "rms_norm_no_eps" else eps, out)

    def rope(self, x, pos, n_heads, head_dim, rope):
        if self.fault == "rope_raises":
            raise RuntimeError("kernel exploded")
        super().rope(x, pos, n_heads, head_dim, rope)

    def embed(self, weight, ids, out):
        super().embed(weight, ids, out)
        if self.fault == "embed_leak":
            self.empty((16,))
        if self.fault == "embed_f16":  # silently keeps data in f16
            out.storage[...] = out.storage.astype(np.float16)

    def argmax(self, x):
        return super().argmax(x) + (self.fault == "argmax_off_by_one")

    def supports_op(self, op, dtypes=()):
        return not (self.fault == "attention_unsupported" and op == "attention") and super().supports_op(op, dtypes)


@pytest.mark.parametrize(
    "fault,op,expect",
    [
        ("matmul_zero_row", "matmul", "NMSE"),
        ("add_oob", "add", "guard elements after the end written"),
        ("swiglu_nan", "swiglu", "NaN/Inf"),
        ("rms_norm_noop", "rms_norm", "NMSE"),
        ("rope_raises", "rope", "RuntimeError: kernel exploded"),
        ("embed_leak", "embed", "leaked 256 bytes of bytes_in_use per run"),
        ("argmax_off_by_one", "argmax", "differ"),
    ],
)
def test_broken_backend_fails(fault, op, expect):
    results = conformance.run_suite(Broken(fault), ops=[op, "add" if op != "add" else "gather_rows"], quick=True)
    broken = [r for r in results if r.op == op]
    assert broken and all(r.status == "fail" and expect in r.message for r in broken), conformance.format_table(broken)
    assert all(r.status == "pass" for r in results if r.op != op), "the suite must go on after a failing case"


def test_data_kept_in_f16_fails_exact_ops():
    """Rounding embed output to f16 is NMSE ~4e-8: invisible at 1e-6, caught at 1e-12. F16/BF16/Q5_1 values are
    exactly representable in f16, so those cases rightly pass."""
    results = conformance.run_suite(Broken("embed_f16"), ops=["embed"], quick=True)
    failed = {r.dtype for r in results if r.status == "fail"}
    assert failed == {t.name for t in quant.SUPPORTED} - {"F16", "BF16", "Q5_1"}, conformance.format_table(results)


def test_dropped_eps_is_caught_by_the_tiny_input_case():
    results = conformance.run_suite(Broken("rms_norm_no_eps"), ops=["rms_norm"], quick=True)
    assert [r.case for r in results if r.status == "fail"] == ["T=2 d=576 eps=1e-05 tiny-x"]


def test_localised_error_is_caught_where_nmse_dilutes_it():
    """One zeroed output column of a 4099-wide matmul is NMSE ~2.4e-4, under the threshold: max error catches it."""
    case = next(
        c
        for c in conformance.cases()
        if c.op == "matmul" and c.dtype == "Q8_0" and c.params["N"] == 4099 and c.params["T"] == 7
    )
    r = conformance.run_case(Broken("matmul_last_col"), case)
    assert r.status == "fail" and r.nmse < conformance.THRESHOLDS["matmul"][0] and "out: element (" in r.message


def test_unsupported_op_is_skipped_not_passed():
    results = conformance.run_suite(Broken("attention_unsupported"), ops=["attention"], quick=True)
    assert results and all(r.status == "skip" for r in results)
    assert "does not support attention(f32)" in results[0].message


def test_oob_write_is_caught_even_when_values_are_right():
    r = conformance.run_suite(Broken("add_oob"), ops=["add"], quick=True)[0]
    assert r.nmse == 0 and r.status == "fail"


# --- positive controls: correct arithmetic that differs from the reference must pass -----------------------------

f32 = np.float32


class GpuStyle(NumpyDevice):
    """Emulates how GPU kernels compute, to show the thresholds are not tighter than correct kernels allow: f16 KV
    cache, f32 rope angles, a tree-reduced rms_norm, chunked online softmax with f16 probabilities, and matmul with
    activations quantized to 8 bits per 32-block (llama.cpp's q8_1 path)."""

    kv_dtype = "f16"

    def rms_norm(self, x, weight, eps, out):
        xf = x.storage.astype(f32)
        sq = np.pad(xf * xf, ((0, 0), (0, -xf.shape[1] % 64))).reshape(xf.shape[0], -1, 64).sum(1, dtype=f32)
        while sq.shape[1] > 1:
            sq = sq[:, ::2] + sq[:, 1::2]
        out.storage[...] = xf * (f32(1) / np.sqrt(sq / f32(xf.shape[1]) + f32(eps))) * weight.storage

    def rope(self, x, pos, n_heads, head_dim, rope):
        xs, neox = x.storage.reshape(x.shape[0], n_heads, head_dim), rope.neox
        angle = pos.storage.astype(f32)[:, None, None] * rope.inv_freq(head_dim).astype(f32)
        cos, sin, h = np.cos(angle) * f32(rope.mscale), np.sin(angle) * f32(rope.mscale), head_dim // 2
        a, b = (xs[..., :h].copy(), xs[..., h:].copy()) if neox else (xs[..., 0::2].copy(), xs[..., 1::2].copy())
        first, second = (xs[..., :h], xs[..., h:]) if neox else (xs[..., 0::2], xs[..., 1::2])
        first[...], second[...] = a * cos - b * sin, a * sin + b * cos

    def matmul(self, x, weight, out, bias=None):
        blocks = x.storage.reshape(x.shape[0], -1, 32)
        scale = np.abs(blocks).max(-1, keepdims=True) / f32(127)
        xq = (np.round(blocks / np.where(scale == 0, 1, scale)) * scale).reshape(x.shape).astype(f32)
        result = xq @ self.dense(weight).T
        out.storage[...] = result + bias.storage if bias is not None else result

    def attention(self, q, k, v, k_cache, v_cache, kv, out, n_heads, n_kv_heads, head_dim):
        T, positions, slots = q.shape[0], kv.pos.storage.astype(np.int64), kv.slot.storage.astype(np.int64)
        kc, vc, table, B = k_cache.storage, v_cache.storage, kv.table.storage.astype(np.int64), kv.block_size
        kc[:, slots] = k.storage.reshape(T, n_kv_heads, head_dim).transpose(1, 0, 2)
        vc[:, slots] = v.storage.reshape(T, n_kv_heads, head_dim).transpose(1, 0, 2)
        qs, group, o = q.storage.reshape(T, n_heads, head_dim), n_heads // n_kv_heads, np.empty((T, n_heads, head_dim))
        for first, n, row in kv.runs:  # tiles of 32 keys with an online softmax, as the GPU kernels do
            pos = positions[first : first + n]
            n_kv = int(pos.max()) + 1
            rows = table[row, np.arange(n_kv) // B] * B + np.arange(n_kv) % B
            for h in range(n_heads):
                keys, vals = kc[h // group, rows].astype(f32), vc[h // group, rows].astype(f32)
                m, s, acc = np.full(n, -np.inf, f32), np.zeros(n, f32), np.zeros((n, head_dim), f32)
                for j in range(0, n_kv, 32):
                    scores = qs[first : first + n, h] @ keys[j : j + 32].T * f32(head_dim**-0.5)
                    scores[np.arange(j, min(j + 32, n_kv))[None] > pos[:, None]] = -np.inf
                    m_new = np.maximum(m, scores.max(-1))
                    p = np.exp(scores - m_new[:, None]).astype(np.float16).astype(f32)
                    s, acc = s * np.exp(m - m_new) + p.sum(-1), acc * np.exp(m - m_new)[:, None] + p @ vals[j : j + 32]
                    m = m_new
                o[first : first + n, h] = acc / s[:, None]
        out.storage[...] = o.reshape(T, -1)


def test_gpu_style_arithmetic_passes():
    results = conformance.run_suite(GpuStyle(), quick=True)
    failed = [r for r in results if r.status == "fail"]
    assert not failed, conformance.format_table(failed)
    assert all(r.dtype == "f16" for r in results if r.op == "attention")
    worst = {op: max(r.nmse for r in results if r.op == op) for op in ("matmul", "rope", "attention")}
    assert 1e-6 < worst["matmul"] < conformance.THRESHOLDS["matmul"][0] / 3  # 8-bit activations are not free
    assert worst["attention"] > 1e-10  # the f16 probabilities really differ from the reference


# --- the basic kernels themselves -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", conformance.BASIC_KERNELS)
def test_basic_kernel_sources_exist(name):
    wgsl = conformance.kernel_source(name, "wgsl")
    cuda = conformance.kernel_source(name, "cuda")
    assert "fn main(" in wgsl and "@compute" in wgsl
    assert f'extern "C" __global__ void {name}(' in cuda


def test_basic_wgsl_kernels_validate():
    """naga validates each shader and builds its pipeline, independently of the wgpu backend."""
    wgpu = pytest.importorskip("wgpu")
    adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    if adapter is None:
        pytest.skip("no WebGPU adapter")
    device = adapter.request_device_sync()
    for name in conformance.BASIC_KERNELS:
        module = device.create_shader_module(code=conformance.kernel_source(name, "wgsl"))
        device.create_compute_pipeline(layout="auto", compute={"module": module, "entry_point": "main"})
