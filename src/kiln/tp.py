"""Tensor parallelism across the GPUs of one host: one process, one thread per rank, all-reduce through NCCL.

Each rank is a kiln.model.Model on its own device holding one ShardedFile (shard.py: the Megatron split, two
all-reduces per layer through Model's `all_reduce` hook), driven by its own kiln.session.Session with its own KV
cache. Rank 0 runs on the caller's thread, ranks 1..N-1 on persistent worker threads, because CUDA's current device
and CuPy's handles are per thread. Every call runs on all ranks at once with the same tokens, so every rank builds the
same Batch (its block manager hands out the same blocks), and returns rank 0's result (the logits, which every rank
holds in full): generate and kiln bench drive a TensorParallelModel as the Session kiln.session.solo() gives them
(solo returns it as it is). The batched scheduler (Model.forward over a shared cache, kiln serve) is not offered:
make_cache() says so. Like a Model on a GPU, use it on the thread that made it.

The all-reduce is a device op (`all_reduce` of _nccl_device_class), not a host callback: the cuda backend records it
like the model's other ops, so a decode step, NCCL calls included, is captured into one CUDA graph per rank (NCCL
supports stream capture). The fusion pass meets the all-reduce between each row-parallel GEMV and its residual add,
so that pair stays unfused. KILN_CUDA_GRAPHS=0 runs every step eagerly instead, which costs far more here than on one
GPU: the rank threads hand the GIL back and forth at every launch (2 x H100, random Llama-7B Q8_0: 256 tok/s decode
with graphs, 19 without; one GPU 197 and 62). A prefill size seen twice is captured too, NCCL calls included, as on
one GPU (cuBLAS through the backend's own handle); a decode step whose capture fails runs eagerly from then on. The
tensors the ranks all-reduce live in an NCCL symmetric window (_NcclWindows, NCCL >= 2.27;
KILN_TP_WINDOW=0 turns it off), where NCCL runs its symmetric kernels: 4.1 instead of 6.7 us per 16 KB all-reduce.
2 x H200 (bench/results/h200x2-tp-d.json): 7B Q8_0 decode 485 tok/s vs 374 on one GPU (1.30x; 592 with the
all-reduces left out), prefill 22.4k vs 14.7k; 70B Q4_0 decode 74.0 vs 47.5 (1.56x). Greedy decoding feeds each
rank's argmax to its next step on the GPU (greedy()), as on one GPU.

The residual add is folded into the all-reduce (fold_residual): rank 0 adds its partial sum into the residual stream
x (the cuda backend fuses that add into the GEMV) and the other ranks write their partial sums straight into x, so one
all-reduce of x leaves x + sum of the partials on every rank: no separate add kernel per all-reduce (KILN_TP_FOLD=0
restores matmul, all-reduce, add). The rank devices take each step's ops from model.py, fold them and hand them on
to the backend's public op methods inside its replay() (_FoldingRank), so the backend records, fuses and captures
the folded step without tp.py touching its internals. KILN_TP_DIAG_SKIP_ALLREDUCE=1 is a diagnostic for benchmarks
only: the all-reduces are left out, so the output is wrong, and the time saved is what they cost inside the graph.

NVLink multicast (NVLS) is switched off before NCCL starts: on the shared hosts kiln is tested on, a program that
uses it can take the host's GPUs out of service, and two to eight ranks summing one activation row gain nothing by it.

After a failure on any rank once a step has begun, the ranks' collectives are out of step: the communicators are
aborted and the model refuses further calls (close it and load again). Inputs that would fail on every rank (an empty
prompt, a context overflow) are rejected before any rank starts, so they leave the model usable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from . import gguf as gguf_mod
from .errors import BackendUnavailable, ContextOverflow, InvalidArgument, KilnError
from .gguf import GGUFFile
from .model import Model
from .runtime.base import BufferPool, Device, Tensor
from .runtime.fusion import READS, WRITES
from .session import Session
from .shard import ShardedFile, plan_for

TP_BACKENDS = ("cuda",)  # what api.load offers; backend="numpy" below is the same schedule on the CPU, for tests


class TensorParallelError(KilnError):
    """A rank failed once a step had begun: the ranks no longer agree, so the model must be loaded again."""


# --- ranks as threads ------------------------------------------------------------------------------------------------
class _Worker:
    """A persistent thread running one rank's calls in order; the rank's device state lives on it."""

    def __init__(self, rank: int):
        self.rank = rank
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=f"kiln-tp-rank{rank}", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        while True:
            fn = self._jobs.get()
            if fn is None:
                return
            try:
                self._done.put((True, fn()))
            except BaseException as e:  # handed to the caller's thread by result()
                self._done.put((False, e))

    def submit(self, fn: Callable[[], Any]) -> None:
        self._jobs.put(fn)

    def result(self) -> tuple[bool, Any]:
        return self._done.get()

    def stop(self, timeout: float = 30.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)


# --- the residual fold -----------------------------------------------------------------------------------------------
def _dead_after(ops: list, j: int, t: Tensor, tid: Callable[[Tensor], object]) -> bool:
    """`t` is overwritten after ops[j] before anything reads it, or never read again in the step (the host reads only
    the logits of a step)."""
    p = tid(t)
    for name, args in ops[j + 1 :]:
        if any(tid(args[a]) == p for a in READS[name]):
            return False
        if any(tid(args[a]) == p for a in WRITES[name]):
            return True
    return True


def fold_residual(ops: list, rank: int, tid: Callable[[Tensor], object]) -> list:
    """Rewrite each recorded `matmul(a, W, h), all_reduce(h), add(x, h, x)` of a step (model.py's row-parallel
    projection, its all-reduce and the residual add) so the add disappears into the all-reduce:

        rank 0:      matmul(a, W, h), add(x, h, x), all_reduce(x)    (the backend fuses matmul + add into one GEMV)
        other ranks: matmul(a, W, x), all_reduce(x)

    The sum is x + sum of the partials on every rank, as before, added in another order. Only where h is dead after
    the add (it is: the next norm overwrites it), the matmul has no bias and reads neither x nor h."""
    out, i = [], 0
    while i < len(ops):
        if i + 3 <= len(ops) and (ops[i][0], ops[i + 1][0], ops[i + 2][0]) == ("matmul", "all_reduce", "add"):
            a, w, h = ops[i][1][:3]
            bias = ops[i][1][3] if len(ops[i][1]) > 3 else None
            (r,) = ops[i + 1][1]
            p, q, x = ops[i + 2][1]
            th, tx = tid(h), tid(x)
            if (
                bias is None
                and tid(r) == th
                and tx != th
                and {tid(p), tid(q)} == {th, tx}
                and tid(a) not in (th, tx)
                and x.shape == h.shape
                and x.dtype == h.dtype
                and _dead_after(ops, i + 2, h, tid)
            ):
                if rank == 0:
                    out += [ops[i], ops[i + 2], ("all_reduce", (x,))]
                else:
                    out += [("matmul", (a, w, x, None)), ("all_reduce", (x,))]
                i += 3
                continue
        out.append(ops[i])
        i += 1
    return out


def _fold_enabled() -> bool:
    return os.environ.get("KILN_TP_FOLD", "1") != "0"


# --- collectives -----------------------------------------------------------------------------------------------------
class _NcclGroup:
    """One NCCL communicator per GPU of `indices`, all made by one ncclCommInitAll (a single process)."""

    def __init__(self, indices: list[int]):
        from .runtime import cuda_backend  # BackendUnavailable with the usual message when CuPy is missing

        os.environ["NCCL_NVLS_ENABLE"] = "0"  # read by NCCL when it initialises, which is below
        nccl = _import_nccl()
        try:
            count = cuda_backend.cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # no driver, no device
            raise BackendUnavailable(f"cuda: no usable NVIDIA GPU ({e})") from None
        missing = [i for i in indices if not 0 <= i < count]
        if missing:
            raise BackendUnavailable(
                f"--tensor-parallel {len(indices)} needs GPUs {indices[0]}..{indices[-1]} but "
                f"this machine has {count} (see `kiln devices`); use fewer ranks"
            )
        self.nccl, self.indices, self._device_class = nccl, indices, _nccl_device_class()
        self.comms = nccl.NcclCommunicator.initAll(list(indices))
        self.windows: _NcclWindows | None = None
        if os.environ.get("KILN_TP_WINDOW", "1") != "0":
            try:
                mib = int(os.environ.get("KILN_TP_WINDOW_MB", "64"))
                self.windows = _NcclWindows(self.comms, indices, mib << 20)
            except (OSError, AttributeError, RuntimeError) as e:  # NCCL < 2.27, or no CUDA VMM
                print(f"kiln: note: no NCCL symmetric window ({e}); all-reduces use NCCL's usual path", file=sys.stderr)

    def device(self, rank: int) -> Device:  # on the rank's thread
        return self._device_class(self.indices[rank], self.comms[rank], rank, self.windows)

    def reducer(self, rank: int, dev: Device) -> Callable[[Tensor], None]:
        return dev.all_reduce

    def release(self) -> None:
        """Called on a failing rank's thread: nothing to do, host threads never wait for each other here (only the
        GPUs do), and aborting a communicator another thread is still calling is not safe."""

    def abort(self) -> None:
        for comm in self.comms:
            try:
                comm.abort()  # pending collectives return instead of waiting for a rank that will never come
            except Exception:
                pass

    def close(self) -> None:
        if self.windows is not None:
            self.windows.release(self.comms)
            self.windows = None
        for comm in self.comms:
            comm.destroy()
        self.comms = []


class _WindowFull(Exception):
    pass


class _NcclWindows:
    """NCCL symmetric memory (NCCL >= 2.27): one buffer per rank from ncclMemAlloc, registered as a symmetric window
    of its communicator. An all-reduce of a buffer at the same offset of the window on every rank runs NCCL's
    symmetric kernels (2 x H200, bench/tp_allreduce.py: 4.2 instead of 6.5 us for 16 KB). Each rank's device puts
    the tensors it will all-reduce there (Device.empty_for_all_reduce), allocating in the same order on every rank;
    check_offset() verifies that the offsets agree. Made for all ranks from one thread (ncclGroupStart/End), so a
    failure leaves no rank waiting for another."""

    def __init__(self, comms: list, indices: list[int], nbytes: int):
        from .runtime.cuda_backend import cupy

        self.lib = lib = ctypes.CDLL("libnccl.so.2")  # the library CuPy loaded
        lib.ncclGetErrorString.restype = ctypes.c_char_p
        self.nbytes, self.ptrs, self.wins = nbytes, [], []
        self._lock = threading.Lock()
        self._log: list[list[int]] = [[] for _ in indices]
        try:
            for index in indices:
                ptr = ctypes.c_void_p()
                with cupy.cuda.Device(index):
                    self._check("ncclMemAlloc", ctypes.byref(ptr), ctypes.c_size_t(nbytes))
                self.ptrs.append(ptr)
            self._check("ncclGroupStart")
            try:
                for comm, ptr in zip(comms, self.ptrs):
                    win = ctypes.c_void_p()
                    comm_p, size, symmetric = ctypes.c_void_p(comm.comm), ctypes.c_size_t(nbytes), ctypes.c_int(1)
                    self._check("ncclCommWindowRegister", comm_p, ptr, size, ctypes.byref(win), symmetric)
                    self.wins.append(win)
            finally:
                self._check("ncclGroupEnd")
        except BaseException:
            self.release(comms)
            raise

    def _check(self, name: str, *args) -> None:
        rc = getattr(self.lib, name)(*args)
        if rc != 0:
            raise RuntimeError(f"{name}: {self.lib.ncclGetErrorString(rc).decode()}")

    def base(self, rank: int) -> int:
        return self.ptrs[rank].value

    def check_offset(self, rank: int, offset: int) -> None:
        """Record where rank's next all-reduced tensor went (-1: outside the window); the ranks must agree."""
        with self._lock:
            log = self._log[rank]
            log.append(offset)
            i = len(log) - 1
            for r, other in enumerate(self._log):
                if len(other) > i and other[i] != offset:
                    raise TensorParallelError(
                        f"all-reduce buffers at different window offsets: rank {r} {other[i]}, rank {rank} {offset}"
                    )

    def release(self, comms: list) -> None:
        """Deregister and free (after every device using the windows is closed); best effort after an abort."""
        try:
            if self.wins:
                self._check("ncclGroupStart")
                try:
                    for comm, win in zip(comms, self.wins):
                        self._check("ncclCommWindowDeregister", ctypes.c_void_p(comm.comm), win)
                finally:
                    self._check("ncclGroupEnd")
        except RuntimeError:
            pass
        for ptr in self.ptrs:
            self.lib.ncclMemFree(ptr)
        self.wins, self.ptrs = [], []


class _HostGroup:
    """NumPy devices summing through a barrier (rank order, as SimulatedTP): the same schedule on the CPU."""

    def __init__(self, n: int, timeout: float = 60.0):
        self._barrier = threading.Barrier(n, timeout=timeout)
        self._parts: list = [None] * n

    def device(self, rank: int) -> Device:
        return _host_device_class()(rank, self._sum)

    def _sum(self, rank: int, dev: Device, t: Tensor) -> None:
        self._parts[rank] = dev.download(t)
        self._barrier.wait()
        total = self._parts[0].copy()
        for part in self._parts[1:]:
            total += part
        self._barrier.wait()  # nobody overwrites its part before every rank has summed
        dev.write(t, total)

    def reducer(self, rank: int, dev: Device) -> Callable[[Tensor], None]:
        return dev.all_reduce

    def release(self) -> None:
        self._barrier.abort()  # the other ranks' threads wait in the barrier: free them now

    def abort(self) -> None:
        self._barrier.abort()

    def close(self) -> None:
        pass


class _FoldingRank:
    """A rank device's model ops, taken during replay() and handed to the backend after fold_residual. The fold
    rewrites what model.py called before the backend records, fuses or captures anything, through the backend's
    public op methods and replay() alone, so it needs nothing of the backend's internals. Subclasses say how tensors
    are told apart (tid: the start of their memory) and how a sum across the ranks runs (_all_reduce)."""

    rank: int = 0
    fold: bool = True
    _taking: list | None = None  # the ops of the step being taken, or None: ops go straight to the backend

    def tid(self, t: Tensor) -> int:
        raise NotImplementedError

    def _all_reduce(self, t: Tensor) -> None:
        raise NotImplementedError

    def _folded(self, step: Callable[[], None]) -> Callable[[], None]:
        """step, with its ops taken, folded and then issued (to the backend's recorder, when it records)."""

        def folded() -> None:
            self._taking = ops = []
            try:
                step()
            finally:
                self._taking = None
            for name, args in fold_residual(ops, self.rank, self.tid):
                self._issue(name, args)

        return folded

    def replay(self, key: Any, step) -> None:
        super().replay(key, self._folded(step) if self.fold else step)  # type: ignore[misc]

    def _take(self, name: str, args: tuple) -> None:
        if self._taking is not None:
            self._taking.append((name, args))
        else:
            self._issue(name, args)

    def _issue(self, name: str, args: tuple) -> None:
        if name == "all_reduce":
            self._all_reduce(*args)
        else:
            getattr(super(), name)(*args)

    def all_reduce(self, t: Tensor) -> None:
        self._take("all_reduce", (t,))

    def embed(self, weight, ids, out) -> None:
        self._take("embed", (weight, ids, out))

    def rms_norm(self, x, weight, eps, out) -> None:
        self._take("rms_norm", (x, weight, eps, out))

    def matmul(self, x, weight, out, bias=None) -> None:
        self._take("matmul", (x, weight, out, bias))

    def rope(self, x, pos, n_heads, head_dim, rope) -> None:
        self._take("rope", (x, pos, n_heads, head_dim, rope))

    def attention(self, q, k, v, k_cache, v_cache, kv, out, n_heads, n_kv_heads, head_dim) -> None:
        self._take("attention", (q, k, v, k_cache, v_cache, kv, out, n_heads, n_kv_heads, head_dim))

    def swiglu(self, gate, up, out) -> None:
        self._take("swiglu", (gate, up, out))

    def add(self, a, b, out) -> None:
        self._take("add", (a, b, out))

    def gather_rows(self, x, rows, out) -> None:
        self._take("gather_rows", (x, rows, out))


_HOST_DEVICE: type | None = None


def _host_device_class() -> type:
    """NumpyDevice with the same fold of each step as the cuda ranks (_FoldingRank), so the CPU tests check the
    rewritten schedule the GPUs run; all_reduce is the group's barrier sum."""
    global _HOST_DEVICE
    if _HOST_DEVICE is not None:
        return _HOST_DEVICE
    from .runtime.numpy_backend import NumpyDevice

    class HostRankDevice(_FoldingRank, NumpyDevice):
        def __init__(self, rank: int, reduce: Callable[[int, Device, Tensor], None]):
            super().__init__()
            self.rank, self._reduce, self.fold = rank, reduce, _fold_enabled()

        def tid(self, t: Tensor) -> int:
            return _host_tid(t)

        def _all_reduce(self, t: Tensor) -> None:
            self._reduce(self.rank, self, t)

    _HOST_DEVICE = HostRankDevice
    return HostRankDevice


def _host_tid(t: Tensor) -> int:
    return t.storage.__array_interface__["data"][0]


def _import_nccl():
    """cupy.cuda.nccl, with the NCCL of the nvidia-nccl wheel (PyTorch's) loaded first when the loader finds no
    system libnccl: CuPy's module decides once, at import, whether NCCL is there."""
    if "cupy.cuda.nccl" not in sys.modules and ctypes.util.find_library("nccl") is None:
        found = [
            lib
            for base in sys.path
            for lib in glob.glob(os.path.join(base or ".", "nvidia", "*", "lib", "libnccl.so.2"))
        ]
        for lib in found[:1]:
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                pass
    try:
        from cupy.cuda import nccl
    except ImportError as e:
        raise BackendUnavailable(f"cuda: tensor parallelism needs NCCL, which CuPy cannot load ({e})") from None
    if not getattr(nccl, "available", False):
        raise BackendUnavailable(
            "cuda: tensor parallelism needs NCCL, which CuPy cannot load; "
            "pip install nvidia-nccl-cu13 (or put libnccl.so.2 on LD_LIBRARY_PATH)"
        )
    return nccl


_NCCL_DEVICE: type | None = None


def _nccl_device_class() -> type:
    """CudaDevice plus one op, all_reduce: an in-place NCCL sum on the device's stream, recorded by replay() and
    captured into the step's CUDA graph like any other op. Made on first use: importing kiln.tp needs no CuPy."""
    global _NCCL_DEVICE
    if _NCCL_DEVICE is None:
        from .runtime import cuda_backend

        nccl = _import_nccl()
        types = {"f32": nccl.NCCL_FLOAT32, "f16": nccl.NCCL_FLOAT16}
        _NCCL_DEVICE = _make_nccl_device_class(cuda_backend.CudaDevice, types, nccl.NCCL_SUM)
    return _NCCL_DEVICE


def _make_nccl_device_class(base: type, types: dict[str, int], op_sum: int) -> type:
    """The rank device over `base` (CudaDevice; the tests pass a CPU stand-in). Of the backend it uses replay(), the
    op methods, OpRecorder's `_op` / `_do_<name>` contract (fusion.py) for the new op, and `_empty_in` to put tensors
    in the NCCL window; it overrides none of the backend's private methods."""

    class NcclCudaDevice(_FoldingRank, base):
        def __init__(self, index: int, comm, rank: int = 0, windows: _NcclWindows | None = None):
            super().__init__(index)
            self.comm, self.rank, self.windows = comm, rank, windows
            # Tensors to all-reduce live in the rank's symmetric window (bump-allocated, then reused by size).
            self._wpool = BufferPool(self._window_take, lambda raw: None) if windows is not None else None
            self._wnext = 0
            self.fold = _fold_enabled()
            self._eager_steps: set = set()  # keys of decode steps whose graph capture failed
            self._capture_warned = False
            self._last_decode = False  # the last step's batch was a decode (every run one token): from its attention
            self.skip_all_reduce = os.environ.get("KILN_TP_DIAG_SKIP_ALLREDUCE") == "1"
            if self.skip_all_reduce and rank == 0:
                print(
                    "kiln: DIAGNOSTIC: KILN_TP_DIAG_SKIP_ALLREDUCE=1 leaves every all-reduce out: "
                    "the outputs are wrong, only the timings mean something",
                    file=sys.stderr,
                )

        def tid(self, t: Tensor) -> int:
            return t.storage.data.ptr

        def _all_reduce(self, t: Tensor) -> None:
            self._op("all_reduce", t)  # recorded into the step like the model's ops; runs as _do_all_reduce

        def _do_all_reduce(self, t: Tensor) -> None:
            # In a captured graph, t is also an argument of the kernel that wrote it (the row-parallel GEMV), so the
            # backend already drops the graph when t is freed.
            if not self.skip_all_reduce:
                ptr = self.tid(t)
                self.comm.allReduce(ptr, ptr, t.size, types[t.dtype], op_sum, self.stream.ptr)

        def _take(self, name: str, args: tuple) -> None:
            if name == "attention":
                self._last_decode = args[5].decode
            super()._take(name, args)

        def replay(self, key: Any, step) -> None:
            """A decode step whose capture fails (a driver or NCCL without capture support) runs eagerly from then
            on: right but far slower, so it is said once. The backend handles prefill captures that fail itself."""
            if key in self._eager_steps:
                return (self._folded(step) if self.fold else step)()  # nothing records: the ops run now
            self._last_decode = False
            try:
                super().replay(key, step)
            except Exception as e:
                if not self._last_decode:
                    raise
                self._eager_steps.add(key)
                if not self._capture_warned:
                    self._capture_warned = True
                    print(
                        f"kiln: warning: {self.name}: capturing a decode step with NCCL in a CUDA graph failed "
                        f"({e}); decoding without graphs",
                        file=sys.stderr,
                    )
                # Run the step again without the backend's recorder: whether its first run went through before the
                # capture failed is the backend's business. Every rank fails alike (one driver, one NCCL), so the
                # collectives stay paired; the step rewrites the same KV slots with the same values.
                (self._folded(step) if self.fold else step)()

        def _window_take(self, size: int):
            import cupy

            if self._wnext + size > self.windows.nbytes:
                raise _WindowFull
            ptr = self.windows.base(self.rank) + self._wnext
            self._wnext += size
            return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(ptr, size, self, self.index), 0)

        def empty_for_all_reduce(self, shape) -> Tensor:
            if self._wpool is None:
                return self.empty(shape)
            try:
                tensor = self._empty_in(self._wpool, shape, "f32")
            except _WindowFull:  # every rank runs out at the same allocation: NCCL's default path for this one
                self.windows.check_offset(self.rank, -1)
                return self.empty(shape)
            self.windows.check_offset(self.rank, tensor.storage.data.ptr - self.windows.base(self.rank))
            return tensor

        def memory_stats(self) -> dict:
            stats = super().memory_stats()
            if self._wpool is not None:
                stats["bytes_in_use"] += self._wpool.in_use
                stats["activation_bytes"] += self._wpool.in_use
                stats["window_bytes"] = self.windows.nbytes
            return stats

    return NcclCudaDevice


# --- the model -------------------------------------------------------------------------------------------------------
class TPDevice:
    """`model.dev` of a TensorParallelModel: rank 0's device (argmax and download of the logits) under the group's
    name; memory_stats() adds the ranks up and reports the largest rank's peak. close() closes the whole model."""

    def __init__(self, devices: list[Device], close: Callable[[], None]):
        self.devices, self._close = devices, close
        self.name = f"{devices[0].name} (tensor parallel x{len(devices)})"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.devices[0], name)

    def memory_stats(self) -> dict:
        per = [d.memory_stats() for d in self.devices]
        out = {k: sum(s.get(k, 0) for s in per) for k, v in per[0].items() if isinstance(v, (int, float))}
        out["max_rank_peak_bytes"] = max(int(s.get("peak_bytes", 0)) for s in per)
        out["ranks"] = len(per)
        return out

    def close(self) -> None:
        self._close()


class TensorParallelModel:
    """A model split over n devices (ranks 0..n-1 on GPUs `devices`, default 0..n-1), driven like a
    kiln.session.Session (kiln.session.solo returns it as it is): each rank runs its own Session over its Model and
    cache, and every call hands all ranks the same tokens, so they build the same Batch, block ids included."""

    def __init__(
        self,
        source: GGUFFile | str,
        n: int,
        n_ctx: int | None = None,
        progress: bool = False,
        backend: str = "cuda",
        devices: Sequence[int] | None = None,
    ):
        if n < 1:
            raise KilnError(f"--tensor-parallel must be at least 1, got {n}")
        self.gguf = gguf_mod.load(source) if isinstance(source, str) else source
        self.cfg, self.n = self.gguf.config, n
        self.plan = plan_for(self.gguf, n)  # ShardError (a KilnError) for shapes that do not split n ways
        files = [ShardedFile(self.gguf, r, self.plan) for r in range(n)]  # every shard first: fail before loading
        indices = list(range(n)) if devices is None else [int(i) for i in devices]
        if len(indices) != n or len(set(indices)) != n:
            raise KilnError(f"tensor parallelism over {n} ranks needs {n} distinct devices, got {indices}")
        self.models: list[Model | None] = [None] * n
        self.sessions: list[Session | None] = [None] * n
        self.devices: list[Device | None] = [None] * n
        self._workers: list[_Worker] = []
        self._broken: str | None = None
        self._closed = False
        self._logits: list | None = None  # every rank's logits from the last prefill or step (greedy starts there)
        if backend == "cuda":
            self._group: Any = _NcclGroup(indices)
        elif backend == "numpy":
            self._group = _HostGroup(n)
        else:
            raise KilnError(f"tensor parallelism runs on the cuda backend, not '{backend}'")
        self._workers = [_Worker(r) for r in range(1, n)]

        def load(r: int) -> None:  # on the rank's thread: its device state (and its cache's) lives there
            dev = self.devices[r] = self._group.device(r)
            model = self.models[r] = Model(
                files[r], dev, n_ctx=n_ctx, progress=progress and r == 0, all_reduce=self._group.reducer(r, dev)
            )
            self.sessions[r] = Session(model)

        try:
            self._all(load)
        except BaseException:
            self.close()
            raise
        self.dev = TPDevice(self.devices, self.close)  # type: ignore[arg-type]
        self.n_ctx = self.models[0].n_ctx

    # --- what generation uses (Session's interface) -------------------------------------------------------------
    @property
    def tokens(self) -> list[int]:
        session = self.sessions[0]
        return session.tokens if session is not None else []

    def prefill(self, ids: Sequence[int], chunk: int = 512) -> Tensor:
        self._check()
        ids = list(ids)
        if not ids:
            raise InvalidArgument("cannot run an empty prompt")
        if len(ids) > self.n_ctx:
            raise ContextOverflow(
                f"prompt has {len(ids)} tokens but the context holds {self.n_ctx}; shorten the prompt or raise --ctx"
            )
        self._logits = self._all(lambda r: self.sessions[r].prefill(ids, chunk))
        return self._logits[0]

    def step(self, ids: Sequence[int]) -> Tensor:
        self._check()
        ids = list(ids)
        if len(self.tokens) + len(ids) > self.n_ctx:
            raise ContextOverflow(f"{len(self.tokens) + len(ids)} tokens do not fit the context of {self.n_ctx} tokens")
        self._logits = self._all(lambda r: self.sessions[r].step(ids))
        return self._logits[0]

    def greedy(self, logits: Tensor) -> Iterator[int]:
        """Session.greedy on every rank in lockstep, from the logits of the last prefill or step. Every rank holds
        the full logits (the output head is replicated after the last all-reduce), so each takes its own argmax on
        its device and feeds it to its next step there: the GPUs run step t + 1 while the host waits for token t,
        as on one GPU (2 x H200, 7B Q8_0, 512-token context: 463 tok/s against 427 for the host loop). The ranks'
        tokens are compared: ranks that disagree stop generation with an error (not in the skip-all-reduce
        diagnostic, whose outputs are wrong anyway)."""
        if self._logits is None or logits is not self._logits[0]:
            raise KilnError("TensorParallelModel.greedy takes the logits its last prefill() or step() returned")
        gens = [self.sessions[r].greedy(self._logits[r]) for r in range(self.n)]
        self._logits = None  # the ranks' caches move on from here
        diagnostic = any(getattr(d, "skip_all_reduce", False) for d in self.devices)
        try:
            while True:
                tokens = self._all(lambda r: next(gens[r], None))
                if tokens[0] is None:
                    return
                if any(t != tokens[0] for t in tokens) and not diagnostic:
                    self._broken = f"the ranks' greedy tokens differ: {tokens}"
                    raise TensorParallelError(f"{self._broken}; close the model and load it again")
                yield tokens[0]
        finally:
            for g in gens:
                g.close()

    def reset(self) -> None:
        """Host bookkeeping only (each rank's blocks go back to its pool), so it runs here for every rank."""
        self._logits = None
        for s in self.sessions:
            if s is not None:
                s.reset()

    def rewind(self, n_tokens: int) -> None:
        self._logits = None
        for s in self.sessions:
            if s is not None:
                s.rewind(n_tokens)

    def make_cache(self, *args, **kwargs):
        raise KilnError(
            "tensor parallelism runs one sequence at a time (run, chat, bench); kiln serve --tensor-parallel is not "
            "supported yet"
        )

    def close(self) -> None:
        """Close every rank's model and device on its own thread, then the communicators. Idempotent."""
        if self._closed:
            return
        self._closed = True

        def shut(r: int) -> None:
            session, model, dev = self.sessions[r], self.models[r], self.devices[r]
            self.sessions[r] = self.models[r] = self.devices[r] = None
            if session is not None:
                session.close()
            if model is not None:
                model.close()
            if dev is not None:
                dev.close()

        for w in self._workers:
            w.submit(lambda r=w.rank: shut(r))
        errors = []
        try:
            shut(0)
        except Exception as e:
            errors.append(e)
        for w in self._workers:
            ok, value = w.result()
            if not ok:
                errors.append(value)
            w.stop()
        self._workers = []
        group = getattr(self, "_group", None)
        if group is not None:
            group.close()
        if errors:
            raise errors[0]

    # --- running every rank ---------------------------------------------------------------------------------------
    def _check(self) -> None:
        if self._closed:
            raise KilnError("this tensor-parallel model is closed")
        if self._broken is not None:
            raise TensorParallelError(
                f"this tensor-parallel model failed earlier ({self._broken}); close it and load it again"
            )

    def _all(self, fn: Callable[[int], Any]) -> list:
        """fn(rank) on every rank at once (rank 0 here, the others on their threads); the results in rank order."""
        self._check()

        def guarded(r: int) -> Any:
            try:
                return fn(r)
            except BaseException:
                self._group.release()
                raise

        for w in self._workers:
            w.submit(lambda r=w.rank: guarded(r))
        results: list = [None] * self.n
        errors: list[tuple[int, BaseException]] = []
        try:
            results[0] = guarded(0)
        except BaseException as e:
            errors.append((0, e))
        for w in self._workers:
            ok, value = w.result()
            if ok:
                results[w.rank] = value
            else:
                errors.append((w.rank, value))
        if errors:
            # The cause, not the ranks that were only waiting for it (a broken barrier on the CPU).
            rank, err = next(((r, e) for r, e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
            self._broken = f"rank {rank}: {type(err).__name__}: {err}"
            self._group.abort()  # every thread has returned: end the collectives still waiting on the GPUs
            raise err
        return results


def load(
    source: GGUFFile | str,
    n: int,
    backend: str | None = None,
    device: int | None = None,
    n_ctx: int | None = None,
    progress: bool = False,
) -> TensorParallelModel:
    """api.load's tensor-parallel path: ranks on GPUs device..device+n-1 of the cuda backend (auto means cuda)."""
    name = (backend or os.environ.get("KILN_BACKEND") or "auto").lower()
    if n < 1:
        raise KilnError(f"--tensor-parallel must be at least 1, got {n}")
    if name not in (*TP_BACKENDS, "auto"):
        raise KilnError(
            f"--tensor-parallel {n} runs on the cuda backend (NCCL between the GPUs of one host), "
            f"not on '{name}'; use --backend cuda or drop --tensor-parallel"
        )
    first = device or 0
    return TensorParallelModel(
        source, n, n_ctx=n_ctx, progress=progress, backend="cuda", devices=range(first, first + n)
    )
