"""CUDA backend (CuPy: NVRTC, cuBLAS, CUDA graphs). Kernels live in kernels/cuda/*.cu.

Weights stay in their GGUF block formats, repacked at upload (on the GPU) so every quant load is an aligned 16-byte
load: scales split from quants for Q8_0/Q4_x/Q5_x/Q6_K, K-quant blocks as they are (kernels/cuda/quant.cuh).
Decode (T = 1) multiplies with GEMV kernels that read those blocks directly (gemv.cu: a warp kernel for short rows,
else a block kernel that keeps its next groups of rows in flight in a cp.async pipeline; Q8_0 dots integer digits of
x with __dp4a); prefill dequantizes a matrix to f16 and multiplies with cuBLAS on the tensor cores.

Decode runs as a CUDA graph. `replay(key, step)` first records the step's ops instead of running them, fuses what
it can (RMSNorm into the next GEMV; Q, K and V in one GEMV that also applies RoPE and writes the KV cache;
gate and up with SwiGLU; each residual add into the GEMV before it), runs the fused plan once, and captures it.
Later steps only write ids/pos and launch the graph: no allocation and no host sync inside a step. Kernels read
positions and the KV length from the `pos` tensor, so one graph serves every position. A graph is dropped when any
buffer it uses is freed. Prefill (T > 1) runs eagerly the first time a prompt size is seen and is captured the
second time (chunked prompts, benchmarks), cuBLAS calls included (_Cublas).
"""

from __future__ import annotations

import collections
import ctypes
import math
import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

from .. import quant
from ..errors import BackendUnavailable, UnsupportedOp
from ..rope import Rope
from .base import DTYPES, BufferPool, Device, Tensor, Weight
from .fusion import Fuser, OpRecorder

try:
    import cupy
except ImportError as e:  # pragma: no cover - depends on the environment
    raise BackendUnavailable(f"cuda: CuPy is not installed ({e}); pip install 'kiln[cuda]'") from None

_KERNELS = resources.files("kiln") / "kernels" / "cuda"

# GGUF type -> format id of quant.cuh; block (elements, bytes) of the formats repacked at upload.
FORMATS = {
    "F32": 0,
    "F16": 1,
    "BF16": 2,
    "Q8_0": 3,
    "Q4_0": 4,
    "Q4_1": 5,
    "Q5_0": 6,
    "Q5_1": 7,
    "Q4_K": 8,
    "Q5_K": 9,
    "Q6_K": 10,
}
_FLOAT = ("F32", "F16", "BF16")
# Activations per 16-byte chunk of a GEMV lane (NA + NB in quant.cuh): K must be a multiple.
_CHUNK = {"F32": 4, "F16": 8, "BF16": 8, "Q8_0": 16}
_DT = {"f32": 0, "f16": 1}

# cuBLAS / CUDA enums (cublas_api.h, library_types.h)
_OP_N, _OP_T = 0, 1
_R_16F, _R_32F = 2, 0
_COMPUTE_32F = 68
_GEMM_DEFAULT = -1

_GEMV_MAX_T = 4  # up to this many tokens, one GEMV launch per token beats dequantize + GEMM
_WARPS = 4  # warps per GEMV block of the warp kernel (gemv.cu NWARPS)
_GEMV_BLOCK_MIN_CHUNKS = 64  # rows of at least this many 16-byte chunks take the block GEMV kernel
# Formats the pipelined GEMV kernel (gemv.cu BK 2) reads, with the 4-byte words each chunk adds to its 16 bytes.
_ASYNC_WORDS = {"F32": 0, "F16": 0, "BF16": 0, "Q8_0": 1, "Q4_0": 1, "Q4_1": 1, "Q5_0": 2, "Q5_1": 2}
_GEMV_STAGES = 3  # groups of rows per block of the pipelined GEMV: the one computed and two in flight
_CUBLAS_WORKSPACE = 32 << 20  # cuBLAS's recommended workspace on Hopper
_PREFILL_GRAPHS = 2  # captured non-decode steps kept (as many as the model keeps activation sets of those shapes)
_SEEN_KEYS = 4096  # step keys counted for "seen twice" before the count starts over
_ATT_TILE = 32  # keys per tile of attn_prefill.cu
_ATT_HEADS_PER_BLOCK = 2  # attn_decode.cu: query heads per block at most (H200 sweep, bench/NOTES.md)
_ATT_SMEM = 46 * 1024  # static shared memory a kernel may take (48 KB, less a margin)


class _LaunchAttr(ctypes.Structure):  # CUlaunchAttribute (cuda.h): id, pad, 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig (cuda.h)
    _fields_ = [
        ("gridDimX", ctypes.c_uint),
        ("gridDimY", ctypes.c_uint),
        ("gridDimZ", ctypes.c_uint),
        ("blockDimX", ctypes.c_uint),
        ("blockDimY", ctypes.c_uint),
        ("blockDimZ", ctypes.c_uint),
        ("sharedMemBytes", ctypes.c_uint),
        ("hStream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttr)),
        ("numAttrs", ctypes.c_uint),
    ]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_CTYPE = {
    np.uint64: ctypes.c_uint64,
    np.int32: ctypes.c_int32,
    np.uint32: ctypes.c_uint32,
    np.float32: ctypes.c_float,
    np.float64: ctypes.c_double,
    np.int64: ctypes.c_int64,
}


def _prefill_smem(rows: int, hd: int) -> int:
    """Static shared memory of attn_prefill.cu for `rows` query rows per block (its __shared__ arrays)."""
    return 4 * (rows * hd + _ATT_TILE * (hd + 1) + _ATT_TILE * hd + rows * _ATT_TILE + 3 * rows) + 64


def _decode_smem(g: int, hd: int, tile: int) -> int:
    """Static shared memory of attn_decode.cu (THREADS = 128); more than any limit where the K/V tiles cannot also
    hold the partial values (KSPLIT * g * hd floats), which reuse them."""
    units = g * hd // 8
    ksplit = 128 // units if units <= 128 else 1
    if ksplit * g * hd > tile * (hd + 8):
        return 1 << 30
    return 4 * tile * (hd + 8) + 4 * (g * hd + g * tile + 3 * g) + 16


def _load_lib(name: str):
    """A shared library this process already loaded (CuPy finds its CUDA libraries itself): the file whose name starts
    with `name`, from /proc/self/maps; None where it is not found."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return None
    path = next((p for p in sorted(paths) if os.path.basename(p).startswith(name)), None)
    return ctypes.CDLL(path) if path else None


class _Cublas:
    """A cuBLAS handle driven through ctypes. CuPy's cuBLAS wrappers set the handle's stream on every call and refuse
    to while a stream is being captured, so no step with a GEMM (prefill) could become a CUDA graph. This handle is
    bound to the backend's stream once, outside any capture, and gets a workspace of its own, so that a captured
    GEMM allocates nothing."""

    def __init__(self, stream: int, workspace: int, workspace_bytes: int):
        from cupy_backends.cuda.libs import cublas

        cublas.create  # noqa: B018 -- attribute access makes CuPy load libcublas, which _load_lib then finds
        self.lib = _load_lib("libcublas.so")
        if self.lib is None:
            raise RuntimeError("kiln: libcublas is not loaded in this process")
        handle = ctypes.c_void_p()
        self._check("cublasCreate_v2", ctypes.byref(handle))
        self.handle = handle
        self._check("cublasSetStream_v2", handle, ctypes.c_void_p(stream))
        self._check("cublasSetWorkspace_v2", handle, ctypes.c_void_p(workspace), ctypes.c_size_t(workspace_bytes))

    def _check(self, fn: str, *args) -> None:
        status = getattr(self.lib, fn)(*args)
        if status:
            raise RuntimeError(f"{fn} failed with cublasStatus_t {status}")

    def gemm_ex(self, ta, tb, m, n, k, alpha, a, a_type, lda, b, b_type, ldb, beta, c, c_type, ldc, compute, algo):
        """cublasGemmEx; alpha and beta are host pointers (read when called, so baked into a captured graph)."""
        i, p = ctypes.c_int, ctypes.c_void_p
        self._check(
            "cublasGemmEx",
            self.handle,
            *(i(v) for v in (ta, tb, m, n, k)),
            p(alpha),
            p(a),
            i(a_type),
            i(lda),
            p(b),
            i(b_type),
            i(ldb),
            p(beta),
            p(c),
            i(c_type),
            i(ldc),
            i(compute),
            i(algo),
        )

    def close(self) -> None:
        self._check("cublasDestroy_v2", self.handle)


class _CupyCublas:
    """_Cublas's interface on CuPy's shared handle (which refuses to be called while a stream is captured)."""

    def gemm_ex(self, *args) -> None:
        from cupy_backends.cuda.libs import cublas

        cublas.gemmEx(cupy.cuda.device.get_cublas_handle(), *args)

    def close(self) -> None:
        pass


_LIBCUDA: Any = None


def _load_libcuda():
    """libcuda through ctypes (launches with attributes, occupancy queries), loaded once; None where it is missing."""
    global _LIBCUDA
    if _LIBCUDA is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            lib.cuLaunchKernelEx.restype = ctypes.c_int
            lib.cuLaunchKernelEx.argtypes = [
                ctypes.POINTER(_LaunchConfig),
                ctypes.c_void_p,
                ctypes.POINTER(ctypes.c_void_p),
                ctypes.c_void_p,
            ]
            _LIBCUDA = lib
        except (OSError, AttributeError):
            return None
    return _LIBCUDA


class _NotRecordable(Exception):
    """A step did something other than ops (a download, a write) while being recorded: run it eagerly."""


@dataclass(frozen=True)
class CudaKernel:
    """A compiled kernel (user kernels from `compile`, and the backend's own)."""

    name: str
    fn: Any


@dataclass
class _Graph:
    graph: Any
    ptrs: list[int] = field(default_factory=list)  # every pointer its kernels were given


def _ptr(x) -> np.uint64:
    """A kernel pointer argument: Tensor, CuPy array, or None (null)."""
    if x is None:
        return np.uint64(0)
    if isinstance(x, Tensor):
        x = x.storage
    return np.uint64(x.data.ptr)


def _tid(t: Tensor) -> int:
    return t.storage.data.ptr


class CudaDevice(OpRecorder, Device):
    backend = "cuda"
    kv_dtype = "f16"
    records_steps = True  # model.py pads batches to buckets: one CUDA graph per decode bucket
    kernel_language = "cuda"

    def __init__(self, index: int | None = None):
        super().__init__()
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # CUDARuntimeError: no driver, no device, driver too old
            raise BackendUnavailable(f"cuda: no usable NVIDIA GPU ({e})") from None
        if count == 0:
            raise BackendUnavailable("cuda: no NVIDIA GPU found")
        index = 0 if index is None else index
        if not 0 <= index < count:
            raise BackendUnavailable(f"cuda: no device {index}; found {count} (see `kiln devices`)")
        self.index = index
        self._device = cupy.cuda.Device(index)
        self._device.use()
        props = cupy.cuda.runtime.getDeviceProperties(index)
        self.gpu_name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        self.sm_count = int(props["multiProcessorCount"])
        self.arch = f"sm_{props['major']}{props['minor']}"
        self.total_memory = int(props["totalGlobalMem"])
        self.smem_optin = int(props.get("sharedMemPerBlockOptin", 48 * 1024))
        self.cc = (int(props["major"]), int(props["minor"]))
        self.name = f"cuda:{index} {self.gpu_name}"
        weights = set(FORMATS)
        self.SUPPORTED_OPS = {
            "embed": weights,
            "matmul": weights | {"f32"},
            "rms_norm": {"F32", "F16", "BF16", "f32", "f16"},
            "rope": {"f32", "f16"},
            "attention": {"f32", "f16"},
            "swiglu": {"f32", "f16"},
            "add": {"f32", "f16"},
            "gather_rows": {"f32", "f16", "i32"},
            "argmax": {"f32", "f16"},
        }
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.mempool = cupy.cuda.MemoryPool()
        self.pool = BufferPool(self.mempool.malloc, lambda p: None)
        self._live: dict[int, tuple[Any, int, BufferPool]] = {}  # id(tensor) -> (MemoryPointer, bucket size, pool)
        self.weight_bytes = 0
        self.scratch_bytes = 0
        self.peak = 0
        self._modules: dict[tuple, Any] = {}
        self._kernels: dict[tuple, CudaKernel] = {}
        self._scratch: dict[Any, Any] = {}  # name (or RoPE table key) -> device array
        self._graphs: dict[tuple, _Graph] = {}
        self._plans: dict[tuple, list] = {}  # the fused plan behind each decode graph (bench/profile_decode.py)
        self._eager_keys: set = set()
        self._rec: list | None = None  # ops being recorded by replay()
        self._capture_ptrs: list | None = None
        self._cublas: _Cublas | _CupyCublas | None = None  # created on first use (_cublas_handle)
        self._one = np.ones(1, np.float32)
        self._zero = np.zeros(1, np.float32)
        # argmax indices: argmax_into's two pinned host buffers, used in turn, and argmax/argmax_rows' own (slot 2),
        # each with an event; grown to the rows asked for (a pending handle keeps its buffer alive)
        self._token_host: list[np.ndarray] = [np.empty(0, np.int32)] * 3
        self._token_events = [cupy.cuda.Event(block=False, disable_timing=True) for _ in range(3)]
        self._token_turn = 0
        self.graphs_enabled = os.environ.get("KILN_CUDA_GRAPHS", "1") != "0"
        self.fuse_enabled = os.environ.get("KILN_CUDA_FUSE", "1") != "0"
        self._fuser = Fuser(_tid, self._gemv_ok)
        # GEMV kernel shape (gemv.cu), for benchmarks and tests: auto | warp | block (the register kernel) | pipe
        # (the pipelined kernel wherever the format allows); rows per group, groups per block of the register
        # kernel, pipeline stages (0: the backend's choice); most threads per block.
        self.gemv_kernel = os.environ.get("KILN_GEMV", "auto")
        self.gemv_rows = int(os.environ.get("KILN_GEMV_ROWS", "0"))
        self.gemv_groups_per_block = int(os.environ.get("KILN_GEMV_GPB", "0"))
        self.gemv_max_threads = int(os.environ.get("KILN_GEMV_THREADS", "512"))
        self.gemv_stages = int(os.environ.get("KILN_GEMV_STAGES", "0"))
        self.gemv_max_blocks = int(os.environ.get("KILN_GEMV_BLOCKS", "0"))  # pipelined kernel's grid at most (tests)
        self.gemv_xq = os.environ.get("KILN_GEMV_XQ", "1") != "0"  # Q8_0 block kernels: integer dots (quant.cuh XQ)
        self._gemv_grid: dict[tuple, int] = {}  # pipelined GEMV kernel key -> blocks that fit on the GPU at once
        # Decode attention (attn_decode.cu): keys per tile (0: the largest that fits), key splits per KV head at most,
        # query heads per block at most (0: _ATT_HEADS_PER_BLOCK).
        self.attn_tile = int(os.environ.get("KILN_CUDA_ATTN_TILE", "0"))
        self.attn_max_splits = int(os.environ.get("KILN_CUDA_ATTN_SPLITS", "64"))
        self.attn_heads_per_block = int(os.environ.get("KILN_CUDA_ATTN_HEADS", "0"))
        # Programmatic dependent launch inside captured graphs: each kernel's launch and weight loads overlap the
        # tail of the kernel before it (kernels call pdl_wait() before reading what it wrote).
        self._libcuda = _load_libcuda() if props["major"] >= 9 else None
        self.pdl_enabled = self._libcuda is not None and os.environ.get("KILN_CUDA_PDL", "1") != "0"
        self._seen: dict[tuple, int] = {}
        self._prefill_keys: collections.deque = collections.deque()  # captured non-decode steps, oldest first
        self.closed = False

    def describe(self) -> str:
        lines = [self.name]
        for i in range(cupy.cuda.runtime.getDeviceCount()):
            p = cupy.cuda.runtime.getDeviceProperties(i)
            name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
            mark = "*" if i == self.index else " "
            lines.append(
                f"  {mark} [{i}] {name} (sm_{p['major']}{p['minor']}, {p['multiProcessorCount']} SMs, "
                f"{p['totalGlobalMem'] / 2**30:.0f} GiB)"
            )
        return "\n".join(lines)

    # --- memory -------------------------------------------------------------------------------------------------
    def _track_peak(self) -> None:
        self.peak = max(self.peak, self.pool.in_use + self.weight_bytes + self.scratch_bytes)

    def _array(self, shape, dtype) -> Any:
        """A device array outside the activation pool (weights, scratch), from this device's memory pool."""
        nbytes = max(1, math.prod(shape) * np.dtype(dtype).itemsize)
        return cupy.ndarray(shape, dtype, memptr=self.mempool.malloc(nbytes))

    def empty(self, shape, dtype="f32") -> Tensor:
        return self._empty_in(self.pool, shape, dtype)

    def _empty_in(self, pool: BufferPool, shape, dtype: str) -> Tensor:
        """A tensor from `pool`: the device's own, or another a subclass keeps (kiln.tp: its NCCL window); free()
        gives it back to the pool it came from."""
        shape = tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
        raw, size = pool.take(nbytes)
        tensor = Tensor(self, shape, dtype, cupy.ndarray(shape, DTYPES[dtype], memptr=raw))
        self._live[id(tensor)] = (raw, size, pool)
        self._track_peak()
        return tensor

    def view(self, tensor: Tensor, offset: int, shape) -> Tensor:
        n = math.prod(shape)
        flat = tensor.storage.reshape(-1)
        return Tensor(self, tuple(shape), tensor.dtype, flat[offset : offset + n].reshape(shape))

    def write(self, tensor: Tensor, array: np.ndarray) -> None:
        if self._rec is not None:
            raise _NotRecordable("write")
        data = np.ascontiguousarray(np.asarray(array).astype(DTYPES[tensor.dtype], copy=False)).reshape(tensor.shape)
        if data.nbytes != tensor.nbytes:
            raise ValueError(f"write: {data.nbytes} bytes into a tensor of {tensor.nbytes}")
        # Pageable source: the copy is staged before the call returns, so `data` may go away; ordered on the stream.
        cupy.cuda.runtime.memcpyAsync(
            tensor.storage.data.ptr,
            data.ctypes.data,
            data.nbytes,
            cupy.cuda.runtime.memcpyHostToDevice,
            self.stream.ptr,
        )

    def download(self, tensor: Tensor) -> np.ndarray:
        if self._rec is not None:
            raise _NotRecordable("download")
        out = tensor.storage.get(stream=self.stream)
        self.stream.synchronize()
        return out

    def free(self, tensor: Tensor) -> None:
        raw, size, pool = self._live.pop(id(tensor))
        self._forget(raw.ptr, size)
        pool.give(raw, size)
        tensor.storage = None

    def memory_stats(self) -> dict:
        return {
            **self.pool.stats(),
            "bytes_in_use": self.pool.in_use + self.weight_bytes + self.scratch_bytes,
            "peak_bytes": self.peak,
            "weight_bytes": self.weight_bytes,
            "scratch_bytes": self.scratch_bytes,
            "activation_bytes": self.pool.in_use,
            "device_pool_bytes": self.mempool.total_bytes(),
            "graphs": len(self._graphs),
        }

    def _scratch_array(self, name: str, nbytes: int, zero: bool = False):
        """A grow-only internal buffer (GEMM operands, attention partials). Growing frees the old one, which drops
        any graph that used it."""
        buf = self._scratch.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                self._forget(buf.data.ptr, buf.nbytes)
                self.scratch_bytes -= buf.nbytes
            buf = self._array((max(256, nbytes),), np.uint8)
            if zero:
                buf.fill(0)
            self._scratch[name] = buf
            self.scratch_bytes += buf.nbytes
            self._track_peak()
        return buf

    def sync(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        if self.closed:
            return
        self.sync()
        self._graphs.clear()
        self._plans.clear()
        self._prefill_keys.clear()
        if self._cublas is not None:
            self._cublas.close()
            self._cublas = None
        self._scratch.clear()
        self.scratch_bytes = 0
        for raw, size, pool in self._live.values():
            pool.give(raw, size)
        self._live.clear()
        self.pool.clear()
        self._modules.clear()
        self._kernels.clear()
        self.mempool.free_all_blocks()
        self.closed = True

    # --- weights ------------------------------------------------------------------------------------------------
    def load_weight(self, name, qtype, raw, shape) -> Weight:
        fmt = qtype.name
        if fmt not in FORMATS:
            raise UnsupportedOp(f"backend 'cuda' does not support weight type {fmt} ({name})")
        weight = Weight(name, qtype, tuple(shape))
        weight.extra["fmt"] = fmt
        with self.stream, cupy.cuda.using_allocator(self.mempool.malloc):
            if len(shape) == 1:
                values = quant.dequantize(np.asarray(raw).reshape(1, -1).view(np.uint8), qtype, shape[0])[0]
                weight.storage = {"v": self._upload(values.astype(np.float32))}
            else:
                weight.storage = self._repack(fmt, self._upload(np.asarray(raw, np.uint8)), shape)
        nbytes = sum(a.nbytes for a in weight.storage.values())
        weight.extra["nbytes"] = nbytes
        self.weight_bytes += nbytes
        self._track_peak()
        return weight

    def _upload(self, host: np.ndarray):
        arr = cupy.empty(host.shape, host.dtype)
        arr.set(np.ascontiguousarray(host), stream=self.stream)
        return arr

    @staticmethod
    def _repack(fmt: str, raw, shape) -> dict:
        """Raw GGUF rows (N, row_bytes) -> aligned arrays: q (quants), s (scales), h (Q5 high bits), see quant.cuh."""
        if fmt in _FLOAT or fmt in ("Q4_K", "Q5_K"):
            return {"q": raw}
        n_rows = shape[0]
        size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q6_K": 210}[fmt]
        b = raw.reshape(-1, size)
        if fmt == "Q6_K":
            s = cupy.zeros((b.shape[0], 20), np.uint8)
            s[:, :18] = b[:, 192:210]
            return {"q": b[:, :192].copy().reshape(n_rows, -1), "s": s.reshape(n_rows, -1)}
        ns = 4 if fmt in ("Q4_1", "Q5_1") else 2  # f16 d, or (d, m)
        nh = 4 if fmt in ("Q5_0", "Q5_1") else 0
        out = {"q": b[:, ns + nh :].copy().reshape(n_rows, -1), "s": b[:, :ns].copy().reshape(n_rows, -1)}
        if nh:
            out["h"] = b[:, ns : ns + nh].copy().reshape(n_rows, -1)
        return out

    def free_weight(self, weight: Weight) -> None:
        if isinstance(weight.storage, dict):
            for a in weight.storage.values():
                self._forget(a.data.ptr, a.nbytes)
            self.weight_bytes -= weight.extra.get("nbytes", 0)
        weight.storage = None

    @staticmethod
    def _wptrs(w: Weight) -> tuple:
        st = w.storage
        q = st["q"]
        return _ptr(q), _ptr(st.get("s", q)), _ptr(st.get("h", q))

    # --- kernels ------------------------------------------------------------------------------------------------
    def _module(self, file: str, source: str, defines: dict):
        key = (file, source if file == "user" else None, tuple(sorted(defines.items())))
        mod = self._modules.get(key)
        if mod is None:
            head = "".join(f"#define {k} {int(v) if isinstance(v, bool) else v}\n" for k, v in defines.items())
            if file != "user":
                parts = ["common.cuh"] + (["quant.cuh"] if "FMT" in defines else []) + [file]
                source = "".join((_KERNELS / p).read_text() + "\n" for p in parts)
            mod = cupy.RawModule(code=head + source, options=("-std=c++17",))
            self._modules[key] = mod
        return mod

    def _kernel(self, file: str, name: str, **defines) -> CudaKernel:
        key = (file, name, *defines.items())  # call sites pass defines in a fixed order
        k = self._kernels.get(key)
        if k is None:
            k = CudaKernel(name, self._module(file, "", defines).get_function(name))
            self._kernels[key] = k
        return k

    def _launch(self, k: CudaKernel, grid, block, args, smem: int = 0) -> None:
        """Launch on the current stream (every entry point makes self.stream current)."""
        grid = (grid,) if isinstance(grid, int) else tuple(grid)
        block = (block,) if isinstance(block, int) else tuple(block)
        if self._capture_ptrs is not None:
            self._capture_ptrs.extend(int(a) for a in args if isinstance(a, np.uint64) and a)
            if self.pdl_enabled:
                return self._launch_pdl(k, grid, block, args, smem)
        k.fn(grid, block, args, shared_mem=smem)

    def _launch_pdl(self, k: CudaKernel, grid, block, args, smem: int) -> None:
        """cuLaunchKernelEx with programmatic stream serialization (CuPy has no launch attributes)."""
        grid, block = (*grid, 1, 1)[:3], (*block, 1, 1)[:3]
        attr = _LaunchAttr(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
        cfg = _LaunchConfig(*grid, *block, smem, ctypes.c_void_p(self.stream.ptr), ctypes.pointer(attr), 1)
        values = [_CTYPE[type(a)](a.item()) for a in args]
        params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        err = self._libcuda.cuLaunchKernelEx(ctypes.byref(cfg), k.fn.kernel.ptr, params, None)
        if err:
            raise RuntimeError(f"cuLaunchKernelEx({k.name}) failed with CUresult {err}")

    def compile(self, name: str, source: str, **constants: Any) -> CudaKernel:
        """Compile CUDA C `source` with NVRTC; its `extern "C" __global__` function `name` is the entry point.
        Constants become `#define NAME value` lines (cached by (name, source, constants))."""
        key = ("user", name, source, tuple(sorted(constants.items())))
        k = self._kernels.get(key)
        if k is None:
            k = CudaKernel(name, self._module("user", source, constants).get_function(name))
            self._kernels[key] = k
        return k

    def launch(self, kernel: CudaKernel, grid, buffers, params=None, block=None) -> None:
        """Arguments: each buffer's device pointer, then each param as a 4-byte scalar (Python float -> f32,
        int -> u32, or i32 if negative; NumPy scalars keep their type)."""
        args = [_ptr(t) for t in buffers]
        for p in params or ():
            if isinstance(p, np.generic):
                args.append(p)
            elif isinstance(p, float):
                args.append(np.float32(p))
            else:
                args.append(np.int32(p) if p < 0 else np.uint32(p))
        with self.stream:
            self._launch(kernel, grid, block or 256, tuple(args))

    # --- op dispatch (fusion.OpRecorder): run now, on this device's stream, or record for replay() ---------------
    def _run_op(self, name: str, args: tuple) -> None:
        with self.stream:
            getattr(self, "_do_" + name)(*args)

    # --- ops ----------------------------------------------------------------------------------------------------
    @staticmethod
    def _blocks(n: int, per: int = 256) -> int:
        return max(1, -(-n // per))

    def _do_embed(self, weight, ids, out) -> None:
        fmt, (V, K), T = weight.extra["fmt"], weight.shape, ids.shape[0]
        n = T * K if fmt in _FLOAT else T * K // 32
        k = self._kernel("dequant.cu", "embed", FMT=FORMATS[fmt], DT=_DT[out.dtype])
        args = (*self._wptrs(weight), _ptr(ids), _ptr(out), np.int32(T), np.int32(K), np.int32(V))
        self._launch(k, self._blocks(n), 256, args)

    def _do_rms_norm(self, x, weight, eps, out) -> None:
        d = x.shape[-1]
        rows = x.size // d
        k = self._kernel("elementwise.cu", "rms_norm", DT=_DT[x.dtype])
        self._launch(
            k,
            rows,
            1024 if d >= 4096 else 256,
            (_ptr(x), _ptr(weight.storage["v"]), _ptr(out), np.int32(d), np.float32(eps)),
        )

    def _fast_gemv(self, x: Tensor, weight: Weight) -> bool:
        fmt, K = weight.extra["fmt"], weight.shape[1]
        return x.dtype == "f32" and K % _CHUNK.get(fmt, 32) == 0 and _tid(x) % 16 == 0

    def _do_matmul(self, x, weight, out, bias=None) -> None:
        if x.dtype != "f32" or out.dtype != "f32":
            raise UnsupportedOp(f"cuda matmul takes f32 activations, got {x.dtype} -> {out.dtype}")
        T, K = x.shape
        N = weight.shape[0]
        fmt = weight.extra["fmt"]
        if T <= _GEMV_MAX_T and self._fast_gemv(x, weight):
            for t in range(T):
                self._gemv(_ptr(x) + np.uint64(4 * t * K), K, [(weight, bias, _ptr(out) + np.uint64(4 * t * N))])
        elif T <= _GEMV_MAX_T and fmt in _FLOAT:
            k = self._kernel("dequant.cu", "matvec_float", FMT=FORMATS[fmt], DT=0)
            args = (
                _ptr(x),
                _ptr(weight.storage["q"]),
                _ptr(bias.storage["v"] if bias else None),
                _ptr(out),
                np.int32(T),
                np.int32(N),
                np.int32(K),
            )
            self._launch(k, self._blocks(T * N * 32), 256, args)
        else:
            self._gemm(x, weight, out, bias)

    def _gemv_shape(self, fmt: str, K: int) -> tuple[int, int, int, int, int] | None:
        """(threads, chunks per thread, rows per group, groups per block, stages) of the block GEMV kernels, or None
        for the warp kernel. stages > 0 is the pipelined kernel (BK 2: cp.async into shared memory, a grid of as many
        blocks as fit, `stages` groups of 4 rows per block in the pipeline), taken wherever its format allows; else
        the register kernel (BK 1). Chosen from measurements on an H200 (bench/gemv.py, bench/NOTES.md): the block
        kernels win once a row has enough 16-byte chunks to keep a block busy, except for Q4_K/Q5_K, whose scale
        decoding dominates; end to end the pipelined kernel beat the register kernel on both Q8_0 models measured
        (7B decode 373 against 305 tok/s, TinyLlama 1,395 against 1,356)."""
        nch = K // _CHUNK.get(fmt, 32)
        if self.gemv_kernel == "warp":
            return None
        if self.gemv_kernel == "auto" and (nch < _GEMV_BLOCK_MIN_CHUNKS or fmt in ("Q4_K", "Q5_K")):
            return None
        cpt = -(-nch // self.gemv_max_threads)
        threads = (-(-nch // cpt) + 31) // 32 * 32
        stages = self._gemv_stages(fmt, K, threads, cpt, self.gemv_rows or 4) if self.gemv_kernel != "block" else 0
        if stages:
            return threads, cpt, self.gemv_rows or 4, 0, stages
        # Rows per group times chunks per thread is what each thread keeps in flight, in registers.
        big = fmt in ("Q4_K", "Q5_K", "Q6_K") or _CHUNK.get(fmt, 32) * cpt > 32
        r = self.gemv_rows or (4 if big else 8)
        return threads, cpt, r, self.gemv_groups_per_block or (2 if cpt > 1 else 1), 0

    def _gemv_stages(self, fmt: str, K: int, threads: int, cpt: int, rows: int) -> int:
        """Pipeline stages of the pipelined GEMV kernel for this shape, or 0 where it does not apply: formats other
        than _ASYNC_WORDS', GPUs before sm_80 (no cp.async), 2-byte scales whose rows would not start 4-byte aligned,
        or stages that do not fit in a block's shared memory."""
        if fmt not in _ASYNC_WORDS or self.cc < (8, 0):
            return 0
        if fmt in ("Q8_0", "Q4_0", "Q5_0") and K % 64:
            return 0
        stages = self.gemv_stages or (_GEMV_STAGES if cpt == 1 else 2)
        while stages >= 2 and self._gemv_smem(fmt, threads, cpt, rows, stages) > self.smem_optin - 4096:
            stages -= 1
        return stages if stages >= 2 else 0

    @staticmethod
    def _gemv_smem(fmt: str, threads: int, cpt: int, rows: int, stages: int) -> int:
        """Dynamic shared memory of the pipelined GEMV kernel (gemv.cu BK 2)."""
        return stages * rows * cpt * threads * (16 + 4 * _ASYNC_WORDS[fmt])

    def _gemv_pipe_grid(self, k: CudaKernel, threads: int, smem: int) -> int:
        """Blocks of a pipelined GEMV kernel resident on the whole GPU at once (its grid): the driver's occupancy
        for this block size and shared memory, set as the kernel's dynamic shared memory limit on first use."""
        key = (k.name, id(k.fn), smem)
        n = self._gemv_grid.get(key)
        if n is None:
            k.fn.max_dynamic_shared_size_bytes = smem
            per_sm = ctypes.c_int(0)
            err = _load_libcuda().cuOccupancyMaxActiveBlocksPerMultiprocessor(
                ctypes.byref(per_sm), ctypes.c_void_p(k.fn.kernel.ptr), ctypes.c_int(threads), ctypes.c_size_t(smem)
            )
            if err or per_sm.value < 1:
                raise RuntimeError(f"cuOccupancyMaxActiveBlocksPerMultiprocessor({k.name}) failed: {err}")
            n = self._gemv_grid[key] = per_sm.value * self.sm_count
        return n

    def _gemv(self, x_ptr, K: int, segs: list, mode: int = 0, norm=None, resid=None, rope=None) -> None:
        """One GEMV launch over up to three weight segments [(weight, bias, out_ptr)] (gemv.cu)."""
        w0 = segs[0][0]
        fmt = w0.extra["fmt"]
        rows = [w.shape[0] for w, _, _ in segs]
        pairs = mode in (2, 3)
        units = rows[0] if mode == 2 else sum(rows) // 2 if mode == 3 else sum(rows)  # rows, or pairs of rows
        consts = dict(FMT=FORMATS[fmt], MODE=mode, NORM=int(norm is not None))
        shape, smem = self._gemv_shape(fmt, K), 0
        if shape is None:
            u = 4 if fmt in ("F32", "F16", "BF16", "Q8_0") else 2
            k = self._kernel("gemv.cu", "gemv", BK=0, R=2, U=u, **consts)
            grid, block = self._blocks(units if pairs else -(-units // 2), _WARPS), 32 * _WARPS
        else:
            threads, cpt, r, per_block, stages = shape
            groups = -(-units // (r // 2 if pairs else r))
            if fmt == "Q8_0":
                consts["XQ"] = int(self.gemv_xq and self.cc >= (6, 1))  # __dp4a needs sm_61
            if stages:
                k = self._kernel("gemv.cu", "gemv", BK=2, NT=threads, CPT=cpt, R=r, S=stages, **consts)
                smem = self._gemv_smem(fmt, threads, cpt, r, stages)
                grid = min(groups, self._gemv_pipe_grid(k, threads, smem), self.gemv_max_blocks or groups)
                block = threads
            else:
                k = self._kernel("gemv.cu", "gemv", BK=1, NT=threads, CPT=cpt, R=r, **consts)
                grid, block = -(-groups // per_block), threads
        args = [
            x_ptr,
            _ptr(norm[0].storage["v"]) if norm else np.uint64(0),
            np.float32(norm[1] if norm else 0.0),
            np.int32(K),
        ]
        for i in range(3):
            if i < len(segs):
                w, b, o = segs[i]
                args += [*self._wptrs(w), _ptr(b.storage["v"] if b is not None else None), o, np.int32(w.shape[0])]
            else:
                args += [np.uint64(0)] * 5 + [np.int32(0)]
        args.append(resid if resid is not None else np.uint64(0))
        if rope is not None:
            kv, rp, hd, kc, vc = rope
            args += [
                _ptr(kv.pos),
                _ptr(kv.slot),
                _ptr(self._rope_table(rp, hd, kv.capacity)),
                np.int32(hd),
                np.int32(rp.neox),
                _ptr(kc),
                _ptr(vc),
                np.int32(kc.shape[1]),
            ]
        else:
            args += [np.uint64(0)] * 3 + [np.int32(2), np.int32(0), np.uint64(0), np.uint64(0), np.int32(0)]
        self._launch(k, grid, block, tuple(args), smem)

    def _rope_table(self, rope: Rope, hd: int, n_ctx: int):
        """RoPE's float32 cos and sin [n_ctx, hd / 2, 2] for the fused QKV GEMV (n_ctx: the table's capacity, past
        every position), made once per (rope, hd, n_ctx)
        by Rope.cos_sin as numpy_backend.rope does, so the fused rotation matches the reference bit for bit."""
        key = ("rope", rope, hd, n_ctx)
        return self._host_table(key, lambda: np.stack(rope.cos_sin(np.arange(n_ctx), hd), axis=-1))

    def _inv_freq_table(self, rope: Rope, hd: int):
        """The float64 inverse frequency per pair [hd / 2] (scaling included) for the standalone rope kernel."""
        return self._host_table(("rope_inv_freq", rope, hd), lambda: rope.inv_freq(hd))

    def _host_table(self, key, make):
        """A constant table computed on the host, uploaded once per key and kept with the scratch buffers."""
        table = self._scratch.get(key)
        if table is None:
            host = np.ascontiguousarray(make())
            table = self._array(host.shape, host.dtype)
            table.set(host)
            self._scratch[key] = table
            self.scratch_bytes += table.nbytes
            self._track_peak()
        return table

    def _x_f16(self, x) -> np.uint64:
        T, K = x.shape
        xh = self._scratch_array("gemm_x", T * K * 2)
        k = self._kernel("elementwise.cu", "to_f16", DT=0)
        self._launch(k, self._blocks(T * K), 256, (_ptr(x), _ptr(xh), np.int32(T * K)))
        return _ptr(xh)

    def _cublas_handle(self) -> _Cublas | _CupyCublas:
        """kiln's own cuBLAS handle, bound to self.stream once, with its own workspace (see _Cublas); CuPy's shared
        handle where that cannot be made (prefill then stays eager: its captures fail, and are let fail)."""
        if self._cublas is None:
            ws = self._scratch_array("cublas_workspace", _CUBLAS_WORKSPACE)
            try:
                self._cublas = _Cublas(self.stream.ptr, ws.data.ptr, ws.nbytes)
            except (OSError, AttributeError, RuntimeError) as e:
                print(f"kiln: warning: cuBLAS through CuPy, prefill runs without CUDA graphs ({e})", file=sys.stderr)
                self._cublas = _CupyCublas()
        return self._cublas

    def _do_matmul_group(self, x, items) -> None:
        """Prefill matmuls that share their input (Q, K, V; gate, up): x goes to f16 once."""
        xh = self._x_f16(x)
        for w, out, bias in items:
            self._gemm(x, w, out, bias, xh)

    def _gemm(self, x, weight, out, bias, xh=None) -> None:
        """out = x @ W^T through cuBLAS: quantized W dequantized to f16 (x converted to f16), f32 accumulation."""
        T, K = x.shape
        N = weight.shape[0]
        fmt = weight.extra["fmt"]
        if fmt in ("F32", "BF16"):
            if fmt == "F32":
                w_ptr = _ptr(weight.storage["q"])
            else:
                w32 = self._scratch_array("gemm_w", N * K * 4)
                k = self._kernel("dequant.cu", "bf16_to_f32", FMT=FORMATS[fmt], DT=0)
                self._launch(k, self._blocks(N * K), 256, (_ptr(weight.storage["q"]), _ptr(w32), np.int32(N * K)))
                w_ptr = _ptr(w32)
            a_type, b_ptr = _R_32F, _ptr(x)
        else:
            b_ptr = self._x_f16(x) if xh is None else xh
            if fmt == "F16":
                w_ptr = _ptr(weight.storage["q"])
            else:
                w16 = self._scratch_array("gemm_w", N * K * 2)
                k = self._kernel("dequant.cu", "dequant_f16", FMT=FORMATS[fmt], DT=0)
                self._launch(
                    k, self._blocks(N * K // 32), 256, (*self._wptrs(weight), _ptr(w16), np.int32(N), np.int32(K))
                )
                w_ptr = _ptr(w16)
            a_type = _R_16F
        # cuBLAS kernels run without PDL (a full dependency on the kernel before).
        self._cublas_handle().gemm_ex(
            _OP_T,
            _OP_N,
            N,
            T,
            K,
            self._one.ctypes.data,
            int(w_ptr),
            a_type,
            K,
            int(b_ptr),
            a_type,
            K,
            self._zero.ctypes.data,
            int(_ptr(out)),
            _R_32F,
            N,
            _COMPUTE_32F,
            _GEMM_DEFAULT,
        )
        if bias is not None:
            out.storage += bias.storage["v"]

    def _do_rope(self, x, pos, n_heads, head_dim, rope) -> None:
        T = x.shape[0]
        n = T * n_heads * (head_dim // 2)
        k = self._kernel("elementwise.cu", "rope", DT=_DT[x.dtype])
        self._launch(
            k,
            self._blocks(n),
            256,
            (
                _ptr(x),
                _ptr(pos),
                np.int32(T),
                np.int32(n_heads),
                np.int32(head_dim),
                _ptr(self._inv_freq_table(rope, head_dim)),
                np.float64(rope.mscale),
                np.int32(rope.neox),
            ),
        )

    def _do_attention(self, q, k, v, k_cache, v_cache, kv, out, n_heads, n_kv_heads, head_dim) -> None:
        if k_cache.dtype != "f16" or v_cache.dtype != "f16":
            raise UnsupportedOp(f"cuda attention keeps its KV cache in f16, got {k_cache.dtype}")
        T = q.shape[0]
        kv_dim = n_kv_heads * head_dim
        kw = self._kernel("elementwise.cu", "kv_write", DT=_DT[k.dtype])
        self._launch(
            kw,
            self._blocks(T * kv_dim),
            256,
            (
                _ptr(k),
                _ptr(v),
                _ptr(kv.slot),
                _ptr(k_cache),
                _ptr(v_cache),
                np.int32(T),
                np.int32(kv_dim),
                np.int32(head_dim),
                np.int32(k_cache.shape[1]),
            ),
        )
        self._attend(q, k_cache, v_cache, kv, out, n_heads, n_kv_heads, head_dim)

    def _attend(self, q, k_cache, v_cache, kv, out, n_heads, n_kv_heads, head_dim) -> None:
        """Attention of each token over its sequence's positions 0..pos[t] (the caches already hold this step's
        rows). Decode batches: one attn_decode.cu launch for all tokens. Otherwise per run, from the host's kv.runs:
        each prompt chunk an attn_prefill.cu launch, each span of one-token runs an attn_decode.cu launch."""
        if head_dim % 8 or n_heads % n_kv_heads:
            raise UnsupportedOp(f"cuda attention needs head_dim % 8 == 0 and whole GQA groups (hd={head_dim})")
        for first, n, row in kv.launches():
            if row < 0:
                self._attend_decode(q, k_cache, v_cache, kv, out, n_heads, n_kv_heads, head_dim, first, n)
            else:
                self._attend_prefill(q, k_cache, v_cache, kv, out, n_heads, n_kv_heads, head_dim, first, n, row)

    @staticmethod
    def _row_ptr(t: Tensor, row: int) -> np.uint64:
        """Pointer to row `row` of a 2-D (or element `row` of a 1-D) tensor."""
        per = t.size // t.shape[0]
        return _ptr(t) + np.uint64(row * per * t.storage.itemsize)

    def _attend_prefill(self, q, k_cache, v_cache, kv, out, n_heads, n_kv_heads, head_dim, first, n, row) -> None:
        """One run: n consecutive tokens of the sequence in table row `row`, from token `first`."""
        G = n_heads // n_kv_heads
        qt = next(c for c in (8, 4, 2, 1) if (G * c <= 32 and _prefill_smem(G * c, head_dim) <= _ATT_SMEM) or c == 1)
        if _prefill_smem(G * qt, head_dim) > _ATT_SMEM:
            raise UnsupportedOp(f"cuda attention: {G} query heads per KV head of dim {head_dim} exceed shared memory")
        k = self._kernel("attn_prefill.cu", "attention", HD=head_dim, G=G, QT=qt, TILE=_ATT_TILE, DT=_DT[q.dtype])
        args = (
            self._row_ptr(q, first),
            _ptr(k_cache),
            _ptr(v_cache),
            self._row_ptr(kv.pos, first),
            self._row_ptr(kv.table, row),
            np.int32(kv.block_size),
            self._row_ptr(out, first),
            np.int32(n),
            np.int32(n_heads),
            np.int32(k_cache.shape[1]),
            np.float32(1.0 / math.sqrt(head_dim)),
        )
        self._launch(k, (n_kv_heads, -(-n // qt)), 128, args)

    def _attend_decode(self, q, k_cache, v_cache, kv, out, n_heads, n_kv_heads, head_dim, first, T) -> None:
        """T one-token rows from token `first` (each its sequence's only token in the step): attn_decode.cu with the
        largest key tile that fits shared memory, per token one block per tile of the context (at most
        attn_max_splits blocks per KV head, fewer when many tokens fill the GPU anyway; past that each block takes
        several tiles) and per group of G query heads (the largest divisor of the GQA group up to
        attn_heads_per_block). The split count comes from kv.capacity, the same for every step of a recorded shape."""
        GQ = n_heads // n_kv_heads
        most = self.attn_heads_per_block or _ATT_HEADS_PER_BLOCK
        G = max(g for g in range(1, GQ + 1) if GQ % g == 0 and g <= most)
        tiles = [c for c in (self.attn_tile or 128, 64, 32) if _decode_smem(G, head_dim, c) <= _ATT_SMEM]
        if not tiles:
            raise UnsupportedOp(f"cuda attention: {G} query heads per KV head of dim {head_dim} exceed shared memory")
        ch = tiles[0]
        ns = max(1, min(-(-kv.capacity // ch), self.attn_max_splits, ch * (head_dim + 8) // (2 * G)))  # merge fits
        if T > 1:  # enough blocks without splitting further: fewer partials to merge
            ns = max(1, min(ns, -(-4 * self.sm_count // (T * n_kv_heads * (GQ // G)))))
        if T * (GQ // G) > 65535:
            raise UnsupportedOp(f"cuda attention: {T} decode rows exceed the grid")
        part = self._scratch_array(f"attn_part{T}", ns * T * n_heads * head_dim * 4)
        ml = self._scratch_array(f"attn_ml{T}", ns * T * n_heads * 8)
        ticket = self._scratch_array(f"attn_ticket{T}", T * n_heads * 4, zero=True)  # one per block of heads
        k = self._kernel("attn_decode.cu", "attn_decode", HD=head_dim, GQ=GQ, G=G, CH=ch, DT=_DT[q.dtype])
        args = (
            self._row_ptr(q, first),
            _ptr(k_cache),
            _ptr(v_cache),
            self._row_ptr(kv.pos, first),
            self._row_ptr(kv.seq, first),
            _ptr(kv.table),
            np.int32(kv.table.shape[1]),
            np.int32(kv.block_size),
            self._row_ptr(out, first),
            _ptr(part),
            _ptr(ml),
            _ptr(ticket),
            np.int32(n_heads),
            np.int32(k_cache.shape[1]),
            np.float32(1.0 / math.sqrt(head_dim)),
        )
        self._launch(k, (ns, n_kv_heads, GQ // G * T), 128, args)

    def _elementwise(self, name: str, a, b, out) -> None:
        n = out.size
        k = self._kernel("elementwise.cu", name, DT=_DT[out.dtype])
        self._launch(k, self._blocks(n), 256, (_ptr(a), _ptr(b), _ptr(out), np.int32(n)))

    def _do_swiglu(self, gate, up, out) -> None:
        self._elementwise("swiglu", gate, up, out)

    def _do_add(self, a, b, out) -> None:
        self._elementwise("add", a, b, out)

    def _do_gather_rows(self, x, rows, out) -> None:
        R = rows.shape[0]
        if out.shape[0] != R or x.dtype != out.dtype or x.size // x.shape[0] != out.size // R:
            raise ValueError(f"gather_rows: {R} rows of {x.shape} {x.dtype} into {out.shape} {out.dtype}")
        words = out.nbytes // R // 2
        k = self._kernel("elementwise.cu", "gather_rows", DT=0)
        self._launch(k, self._blocks(R * words), 256, (_ptr(x), _ptr(rows), _ptr(out), np.int32(R), np.int32(words)))

    def argmax(self, x: Tensor) -> int:
        return self.read_tokens(self._argmax_start(x, 2, rows=1))[0]

    def argmax_rows(self, x: Tensor) -> list[int]:
        return self.read_tokens(self._argmax_start(x, 2))

    def argmax_into(self, x: Tensor, ids: Tensor) -> Any:
        """The indices go to ids on the device and to one of two pinned host buffers (in turn: the previous tokens
        may not have been read yet); read_tokens waits for its event, so the next step is launched before the host
        waits."""
        self._token_turn ^= 1
        return self._argmax_start(x, self._token_turn, ids)

    def read_tokens(self, handle: Any) -> list[int]:
        host, event = handle
        event.synchronize()
        return [int(i) for i in host]

    def _argmax_start(self, x: Tensor, slot: int, ids: Tensor | None = None, rows: int | None = None) -> tuple:
        """Launch the argmax of each row of x (the first `rows`) into ids (or a scratch vector), and copy the
        indices into pinned host buffer `slot`; returns (host indices, event)."""
        if self._rec is not None:
            raise _NotRecordable("argmax")
        N = x.shape[-1]
        R = x.size // N if rows is None else rows
        if ids is not None and (ids.dtype != "i32" or ids.size < R):
            raise ValueError(f"argmax_into: {R} rows into ids {ids.shape} {ids.dtype}")
        with self.stream:
            dst = _ptr(ids) if ids is not None else _ptr(self._scratch_array("argmax_ids", 4 * R))
            k = self._kernel("elementwise.cu", "argmax_rows", DT=_DT[x.dtype])
            self._launch(k, R, 1024, (_ptr(x), np.int32(N), dst))
        if self._token_host[slot].size < R:
            self._token_host[slot] = np.frombuffer(cupy.cuda.alloc_pinned_memory(4 * R), np.int32, R)
        host = self._token_host[slot][:R]
        cupy.cuda.runtime.memcpyAsync(
            host.ctypes.data, int(dst), 4 * R, cupy.cuda.runtime.memcpyDeviceToHost, self.stream.ptr
        )
        self._token_events[slot].record(self.stream)
        return host, self._token_events[slot]

    # --- fused decode ops (from the fusion pass) ----------------------------------------------------------------
    def _do_gemv_qkv(self, x, norm, wq, wk, wv, bq, bk, bv, q, k, v, kv, rope, hd, kc, vc) -> None:
        self._gemv(
            _ptr(x),
            wq.shape[1],
            [(wq, bq, _ptr(q)), (wk, bk, _ptr(k)), (wv, bv, _ptr(v))],
            mode=3,
            norm=norm,
            rope=(kv, rope, hd, kc, vc),
        )

    def _do_gemv_glu(self, x, norm, wg, wu, out, up) -> None:
        self._gemv(_ptr(x), wg.shape[1], [(wg, None, _ptr(out)), (wu, None, _ptr(up))], mode=2, norm=norm)

    def _do_gemv_res(self, x, w, bias, out, resid) -> None:
        self._gemv(_ptr(x), w.shape[1], [(w, bias, _ptr(out))], mode=1, resid=_ptr(resid))

    def _do_gemv_norm(self, x, norm, w, bias, out) -> None:
        self._gemv(_ptr(x), w.shape[1], [(w, bias, _ptr(out))], norm=norm)

    def _do_attend(self, q, kc, vc, kv, out, n_heads, n_kv_heads, head_dim) -> None:
        self._attend(q, kc, vc, kv, out, n_heads, n_kv_heads, head_dim)

    # --- replay: record, fuse, capture --------------------------------------------------------------------------
    def replay(self, key: Any, step) -> None:
        """`key` names the step fully (model.py: model and cache uids, bucket shape, runs unless decode): a step of a
        known key launches its graph. A new decode step (every attention op's batch one-token runs) is recorded,
        fused where T == 1, run and captured; other steps get a graph the second time their key is seen."""
        if not self.graphs_enabled:
            return step()
        g = self._graphs.get(key)
        if g is not None:
            g.graph.launch(stream=self.stream)
            return
        if key in self._eager_keys:
            return step()
        self._rec = []
        try:
            step()
        except _NotRecordable:
            self._eager_keys.add(key)  # nothing recorded has run yet: start over eagerly
            self._rec = None
            return step()
        finally:
            ops, self._rec = self._rec, None
        kvs = [args[5] for name, args in ops if name == "attention"]
        decode = all(kv.decode for kv in kvs) if kvs else all(_tokens(name, args) == 1 for name, args in ops)
        single = all(_tokens(name, args) == 1 for name, args in ops)
        plan = self._fuser.fuse(ops) if decode and single and self.fuse_enabled else self._group_matmuls(ops)
        self._run(plan)  # this step's result; also compiles kernels and sizes scratch before capture
        if len(self._seen) > _SEEN_KEYS:  # keys of steps met once, bounded: a server meets ever new prompt mixes
            self._seen.clear()
        seen = self._seen[key] = self._seen.get(key, 0) + 1
        if decode:
            self._capture(key, plan)
            self._plans[key] = plan
        elif seen >= 2:  # a prefill shape seen again (chunked prompts, benchmarks): worth a graph
            try:
                # Not _capture(): a prefill graph that fails must not switch programmatic dependent launch off for
                # the decode graphs too.
                self._capture_once(key, plan)
            except Exception:
                self._eager_keys.add(key)
                return
            self._prefill_keys.append(key)
            while len(self._prefill_keys) > _PREFILL_GRAPHS:  # prompt mixes vary without end: keep the latest few
                self._graphs.pop(self._prefill_keys.popleft(), None)

    def _group_matmuls(self, ops: list) -> list:
        plan = []
        for name, args in ops:
            if name == "matmul" and args[0].shape[0] > _GEMV_MAX_T and args[1].extra["fmt"] not in ("F32", "BF16"):
                prev = plan[-1] if plan else None
                if prev and prev[0] == "matmul_group" and _tid(prev[1][0]) == _tid(args[0]):
                    prev[1][1].append((args[1], args[2], args[3]))
                    continue
                plan.append(("matmul_group", (args[0], [(args[1], args[2], args[3])])))
            else:
                plan.append((name, args))
        return plan

    def _run(self, plan) -> None:
        with self.stream:
            for name, args in plan:
                getattr(self, "_do_" + name)(*args)

    def _capture(self, gkey, plan) -> None:
        try:
            self._capture_once(gkey, plan)
        except Exception:
            if not self.pdl_enabled:
                raise
            self.pdl_enabled = False  # a driver without programmatic launches in graphs: plain launches
            self._capture_once(gkey, plan)

    def _capture_once(self, gkey, plan) -> None:
        self._capture_ptrs = []
        try:
            with self.stream:
                self.stream.begin_capture()
                try:
                    self._run(plan)
                finally:
                    graph = self.stream.end_capture()
            graph.upload(self.stream)
            self._graphs[gkey] = _Graph(graph, sorted(set(self._capture_ptrs)))
        finally:
            self._capture_ptrs = None

    def _gemv_ok(self, x: Tensor, *weights: Weight) -> bool:
        """One gemv.cu launch can take x with these weights: same repacked format, 2-D, same K."""
        w0 = weights[0]
        return all(
            isinstance(w.storage, dict)
            and w.extra["fmt"] == w0.extra["fmt"]
            and len(w.shape) == 2
            and w.shape[1] == w0.shape[1]
            and self._fast_gemv(x, w)
            for w in weights
        )

    def _forget(self, base: int, size: int) -> None:
        """Drop the graphs that use memory [base, base + size), which is being freed."""
        if not self._graphs:
            return
        for gkey in [k for k, g in self._graphs.items() if any(base <= p < base + size for p in g.ptrs)]:
            del self._graphs[gkey]
            self._plans.pop(gkey, None)


def _tokens(name: str, args) -> int:
    """Rows of the op's activations (the batch size T) as recorded."""
    t = args[{"embed": 2}.get(name, 0)]
    return t.shape[0] if len(t.shape) > 1 or name == "embed" else 1
