"""The backend contract: what every device must provide, plus the shared pieces (tensor handles, buffer pool).

A backend subclasses `Device`, implements the memory methods and the model ops, and lists what it supports in
`SUPPORTED_OPS`. Everything else (pooling, stats, checks, error messages) lives here, once.
Ops write into caller-provided `out` tensors: the model allocates its activations once per batch size, so the
decode loop allocates nothing and GPU backends can record a whole step (one command encoder / one CUDA graph).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UnsupportedOp
from ..rope import Rope

DTYPES = {"f32": np.float32, "f16": np.float16, "i32": np.int32, "u32": np.uint32, "u8": np.uint8}

# Op names used by model.py; each has a NumPy reference in numpy_backend.py.
MODEL_OPS = ("embed", "rms_norm", "matmul", "rope", "attention", "swiglu", "add", "gather_rows", "argmax")


def dtype_name(dtype: Any) -> str:
    for name, np_dtype in DTYPES.items():
        if np.dtype(dtype) == np.dtype(np_dtype):
            return name
    raise ValueError(f"kiln tensors do not support dtype {dtype}")


class Tensor:
    """A device array handle: shape, dtype and the backend's storage. Its lifetime is owned by the device."""

    __slots__ = ("device", "shape", "dtype", "storage", "__weakref__")

    def __init__(self, device: Device, shape: tuple[int, ...], dtype: str, storage: Any):
        self.device, self.shape, self.dtype, self.storage = device, tuple(shape), dtype, storage

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(DTYPES[self.dtype]).itemsize

    def numpy(self) -> np.ndarray:
        return self.device.download(self)

    def __repr__(self) -> str:
        return f"Tensor({self.shape}, {self.dtype}, {self.device.name})"


@dataclass
class Weight:
    """A model weight kept in its GGUF format on the device: `shape` is (rows, cols) = (out, in) for matrices."""

    name: str
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    storage: Any = None
    extra: dict = field(default_factory=dict)

    @property
    def type_name(self) -> str:
        return self.qtype.name


@dataclass(frozen=True, eq=False)
class KVIndex:
    """Where each token of a batch writes and reads the paged KV cache: the attention op's view of a Batch.

    The caches are [n_kv_heads, n_blocks * block_size, head_dim] pools; row `b * block_size + i` is slot i of block b.
    Token t (position pos[t] of the sequence in row seq[t] of `table`) writes its K/V at cache row slot[t], then
    attends to positions 0..pos[t] of that sequence, position j being cache row
    table[seq[t], j // block_size] * block_size + j % block_size.
    The host facts say how the tokens group: `runs` are (first token, tokens, table row) of consecutive tokens of one
    sequence at consecutive positions, covering the batch in order; `max_kv` is the longest key range of any token.
    Backends that replay a recorded step must read positions and tables from the tensors, not from these facts;
    `decode` (every run one token long) is the same for every step of a recorded shape.
    """

    pos: Tensor  # i32 [T]
    slot: Tensor  # i32 [T]
    seq: Tensor  # i32 [T]
    table: Tensor  # i32 [S, W]
    block_size: int
    runs: tuple[tuple[int, int, int], ...]
    max_kv: int

    @property
    def decode(self) -> bool:
        return all(n == 1 for _, n, _ in self.runs)

    @property
    def capacity(self) -> int:
        """The longest sequence the table can address (W blocks)."""
        return self.table.shape[1] * self.block_size

    def tensors(self) -> tuple[Tensor, ...]:
        return self.pos, self.slot, self.seq, self.table

    def launches(self) -> list[tuple[int, int, int]]:
        """How a backend's attention covers the batch: (first token, tokens, table row) per prompt run, and
        (first token, tokens, -1) per span of consecutive one-token runs (one decode launch reads each token's
        sequence from `seq` itself). A decode batch is one span."""
        out: list[tuple[int, int, int]] = []
        for first, n, row in self.runs:
            if n == 1 and out and out[-1][2] == -1:
                out[-1] = (out[-1][0], out[-1][1] + 1, -1)
            else:
                out.append((first, n, -1 if n == 1 else row))
        return out


class BufferPool:
    """Size-bucketed free lists: freed buffers are reused, so steady-state decoding allocates nothing new.

    `make(nbytes)` creates a raw buffer of exactly the bucket size; `destroy(buf)` releases it for real.
    """

    def __init__(self, make, destroy, min_bucket: int = 256):
        self._make, self._destroy, self._min = make, destroy, min_bucket
        self._free: dict[int, list] = defaultdict(list)
        self.in_use = 0
        self.pooled = 0
        self.peak = 0
        self.allocations = 0  # real allocations: a flat count after warm-up proves the loop does not allocate

    def bucket(self, nbytes: int) -> int:
        return max(self._min, 1 << max(0, int(nbytes) - 1).bit_length())

    def take(self, nbytes: int):
        size = self.bucket(nbytes)
        if self._free[size]:
            buf = self._free[size].pop()
            self.pooled -= size
        else:
            buf = self._make(size)
            self.allocations += 1
        self.in_use += size
        self.peak = max(self.peak, self.in_use)
        return buf, size

    def give(self, buf, size: int) -> None:
        self.in_use -= size
        self._free[size].append(buf)
        self.pooled += size

    def clear(self) -> None:
        for bufs in self._free.values():
            for buf in bufs:
                self._destroy(buf)
        self._free.clear()
        self.pooled = 0

    def stats(self) -> dict:
        return {
            "bytes_in_use": self.in_use,
            "bytes_pooled": self.pooled,
            "peak_bytes": self.peak,
            "allocations": self.allocations,
        }


class Device(ABC):
    """The backend contract. See DESIGN.md; numpy_backend.NumpyDevice is the reference implementation."""

    backend: str = "?"
    kv_dtype: str = "f32"  # KV-cache storage; GPU backends use f16 (attention still accumulates in f32)
    records_steps: bool = False  # replay() records steps per shape: batches are padded to a few bucket sizes
    SUPPORTED_OPS: dict[str, set[str]] = {}  # op -> weight/activation dtypes it handles

    def __init__(self) -> None:
        self.name = self.backend

    # --- memory -------------------------------------------------------------------------------------------------
    @abstractmethod
    def empty(self, shape: tuple[int, ...], dtype: str = "f32") -> Tensor: ...

    def empty_for_all_reduce(self, shape: tuple[int, ...]) -> Tensor:
        """An f32 tensor that tensor-parallel ranks will all-reduce (the model's residual stream and block outputs):
        a backend may place it where its collectives run fastest (kiln.tp: an NCCL symmetric window). Elsewhere,
        empty()."""
        return self.empty(shape)

    @abstractmethod
    def write(self, tensor: Tensor, array: np.ndarray) -> None:
        """Copy host data into an existing tensor (same number of elements)."""

    @abstractmethod
    def download(self, tensor: Tensor) -> np.ndarray: ...

    @abstractmethod
    def free(self, tensor: Tensor) -> None: ...

    @abstractmethod
    def memory_stats(self) -> dict: ...

    def view(self, tensor: Tensor, offset: int, shape: tuple[int, ...]) -> Tensor:
        """A tensor aliasing tensor's elements [offset, offset + prod(shape)). The conformance suite surrounds op
        outputs with sentinels this way; offset * itemsize must be a multiple of 256 bytes (WebGPU binding rule).
        The view does not own memory: free the parent, never the view."""
        raise UnsupportedOp(f"backend '{self.backend}' does not support tensor views")

    def upload(self, array: np.ndarray) -> Tensor:
        array = np.ascontiguousarray(array)
        tensor = self.empty(array.shape, dtype_name(array.dtype))
        self.write(tensor, array)
        return tensor

    def zeros(self, shape: tuple[int, ...], dtype: str = "f32") -> Tensor:
        tensor = self.empty(shape, dtype)
        self.write(tensor, np.zeros(shape, DTYPES[dtype]))
        return tensor

    @abstractmethod
    def load_weight(self, name: str, qtype: Any, raw: np.ndarray, shape: tuple[int, ...]) -> Weight:
        """Put a GGUF tensor on the device. `raw` is uint8 (rows, row_bytes) for matrices, or the values for 1-D."""

    def free_weight(self, weight: Weight) -> None:
        weight.storage = None

    # --- execution ----------------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Submit recorded work. Backends that execute eagerly need not override."""

    def sync(self) -> None:
        """Wait until all submitted work is done."""

    def replay(self, key: Any, step) -> None:
        """Run `step()` (a whole forward pass). GPU backends may record it once and replay it (CUDA graph)."""
        step()

    def close(self) -> None:
        """Release every device object this device owns."""

    # --- user kernels -------------------------------------------------------------------------------------------
    def compile(self, name: str, source: str, **constants: Any):
        raise UnsupportedOp(f"backend '{self.backend}' does not compile user kernels")

    def launch(self, kernel, grid, buffers, params=None, block=None) -> None:
        raise UnsupportedOp(f"backend '{self.backend}' does not launch user kernels")

    # --- capability checks --------------------------------------------------------------------------------------
    def supports_op(self, op: str, dtypes: tuple[str, ...] = ()) -> bool:
        supported = self.SUPPORTED_OPS.get(op)
        return supported is not None and all(d in supported for d in dtypes)

    def require_op(self, op: str, *dtypes: str) -> None:
        if not self.supports_op(op, dtypes):
            what = f"{op}({', '.join(dtypes)})" if dtypes else op
            raise UnsupportedOp(
                f"backend '{self.backend}' does not support {what}; supported: {sorted(self.SUPPORTED_OPS.get(op, []))}"
            )

    def check_tensors(self, tensors: dict) -> None:
        """Fail before loading anything if a tensor's format has no kernel here (tensors: name -> TensorInfo)."""
        for name, t in tensors.items():
            op = "embed" if name == "token_embd.weight" else "matmul" if len(t.shape) == 2 else "rms_norm"
            self.require_op(op, t.qtype.name)

    # --- model ops (write into `out`) ---------------------------------------------------------------------------
    @abstractmethod
    def embed(self, weight: Weight, ids: Tensor, out: Tensor) -> None:
        """out[t] = weight[ids[t]] dequantized. ids: i32 [T]; out: [T, d]."""

    @abstractmethod
    def rms_norm(self, x: Tensor, weight: Weight, eps: float, out: Tensor) -> None:
        """out = x / sqrt(mean(x^2) + eps) * weight, per row. x, out: [T, d]."""

    @abstractmethod
    def matmul(self, x: Tensor, weight: Weight, out: Tensor, bias: Weight | None = None) -> None:
        """out = x @ weight^T (+ bias). x: [T, K]; weight: [N, K] in its GGUF format; out: [T, N]."""

    @abstractmethod
    def rope(self, x: Tensor, pos: Tensor, n_heads: int, head_dim: int, rope: Rope) -> None:
        """Rotate x in place. x: [T, n_heads*head_dim]; pos: i32 [T]. rope.neox pairs (i, i+d/2), else (2i, 2i+1);
        pair i turns by pos * rope.inv_freq(head_dim)[i], and cos/sin are scaled by rope.mscale (yarn)."""

    @abstractmethod
    def attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        kv: KVIndex,
        out: Tensor,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
    ) -> None:
        """Write k, v at cache rows kv.slot[t], then causal GQA attention of each token over its own sequence's
        positions 0..kv.pos[t], read through kv.table (see KVIndex). Tokens of different sequences never see each
        other; a batch may mix one-token decode rows with prompt chunks.

        q, out: [T, n_heads*head_dim]; k, v: [T, n_kv_heads*head_dim]; caches: [n_kv_heads, n_slots, head_dim].
        """

    @abstractmethod
    def swiglu(self, gate: Tensor, up: Tensor, out: Tensor) -> None:
        """out = silu(gate) * up."""

    @abstractmethod
    def add(self, a: Tensor, b: Tensor, out: Tensor) -> None:
        """out = a + b (out may alias a)."""

    @abstractmethod
    def gather_rows(self, x: Tensor, rows: Tensor, out: Tensor) -> None:
        """out[r] = x[rows[r]] (rows: i32 [R]): only the tokens that need logits go through the output head."""

    def argmax(self, x: Tensor) -> int:
        """Index of the largest value of a [1, N] tensor (greedy decoding without downloading logits)."""
        return int(np.argmax(self.download(x)[0]))

    def argmax_rows(self, x: Tensor) -> list[int]:
        """Index of the largest value of each row of an [R, N] tensor."""
        return [int(i) for i in np.argmax(self.download(x), axis=-1)]

    def argmax_into(self, x: Tensor, ids: Tensor) -> Any:
        """Start the argmax of each row of an [R, N] tensor: row r's index goes into ids[r] on the device, as the
        next step's input, and comes back to the host later through read_tokens(handle), so a backend can run that
        step while the host waits for the tokens (Session.greedy). This default takes them at once and writes ids
        from the host."""
        tokens = self.argmax_rows(x)
        self.write(ids, np.asarray(tokens, np.int32))
        return tokens

    def read_tokens(self, handle: Any) -> list[int]:
        """The indices an argmax_into call left in ids (waits for the device where it has not finished)."""
        return list(handle)
