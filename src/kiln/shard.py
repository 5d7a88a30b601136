"""Tensor-parallel sharding (Megatron style) as pure functions over GGUF tensors, plus a CPU simulation.

Each of N ranks holds a slice of every block so that a layer costs two all-reduces (model.Model's `all_reduce` hook,
called on the attention output projection and the FFN down projection):

- attention: Q rows by query heads, K/V rows (and the Q/K/V biases) by KV heads -- column-parallel, no communication;
  attn_output by input columns on the same head boundaries -- row-parallel, each rank yields a partial sum.
- FFN: gate/up (and their biases) by rows, ffn_down by input columns over the same d_ff range.
- the biases of the row-parallel attn_output and ffn_down: on rank 0 only, so the all-reduce adds them once.
- replicated: norms, token_embd and output. The vocab-split output head would need an all-gather that model.py has
  no hook for; a replicated head costs vocab * d weights per rank (about 2% of Llama-7B) and keeps logits local.

Column slices of a quantized matrix must start on a block (32 elements, 256 for K-quants): the bytes of a row are
whole blocks, so columns [c0, c1) are bytes [c0 / B * block_bytes, c1 / B * block_bytes) of each row. Row and column
slices alike are views of the memory-mapped file; nothing is copied until a backend uploads the tensor. Attention
boundaries are fixed by the heads, so a misaligned one raises ShardError; FFN boundaries are chosen block-aligned,
uneven when d_ff / N is not a multiple of the alignment (ranks differ by at most one alignment unit).

Unsupported (ShardError): N not dividing n_heads; KV heads that neither split evenly over the ranks (n_kv_heads % N)
nor are replicated whole (N % n_kv_heads) -- otherwise a rank's query heads would straddle KV groups unevenly;
fewer d_ff alignment units than ranks; a rank's head range not block-aligned in attn_output's quant type.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import gguf as gguf_mod
from .errors import KilnError
from .gguf import GGUFFile, ModelConfig, TensorInfo

QK_K = 256  # the largest block of any supported type: an FFN split aligned to it suits every weight format


class ShardError(KilnError, ValueError):
    """The model cannot be split over the requested number of ranks as asked."""


@dataclass(frozen=True)
class RankShard:
    """What one rank holds; every range is [start, stop)."""

    rank: int
    heads: tuple[int, int]  # query heads
    kv_heads: tuple[int, int]  # KV heads (shared with other ranks when replicated)
    ffn: tuple[int, int]  # d_ff columns

    @property
    def n_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def d_ff(self) -> int:
        return self.ffn[1] - self.ffn[0]


@dataclass(frozen=True)
class ShardPlan:
    n: int
    cfg: ModelConfig
    ranks: tuple[RankShard, ...]
    kv_replicated: bool  # n_kv_heads < n: each KV head lives on n / n_kv_heads ranks

    def __getitem__(self, rank: int) -> RankShard:
        if not 0 <= rank < self.n:
            raise ShardError(f"rank {rank} is out of range for {self.n} ranks")
        return self.ranks[rank]


def block_elems(qtype: GGMLQuantizationType) -> int:
    """Elements per block (1 for the float types): the granularity of a column split."""
    return GGML_QUANT_SIZES[GGMLQuantizationType(qtype)][0]


def plan(cfg: ModelConfig, n: int, ffn_align: int = QK_K) -> ShardPlan:
    """Split cfg over n ranks. ffn_align: d_ff boundaries fall on multiples of it (the ffn_down block size, or QK_K
    to suit any format); when d_ff / n is not a multiple, units of ffn_align are dealt out as evenly as possible."""
    H, Hkv = cfg.n_heads, cfg.n_kv_heads
    if n < 1:
        raise ShardError(f"tensor parallelism needs at least 1 rank, got {n}")
    if H % n:
        raise ShardError(f"cannot split {H} attention heads over {n} ranks: the rank count must divide n_heads")
    if Hkv % n and n % Hkv:
        raise ShardError(
            f"cannot split {Hkv} KV heads over {n} ranks: the rank count must divide n_kv_heads "
            f"or be a multiple of it (KV heads are then replicated)"
        )
    units = -(-cfg.d_ff // ffn_align)
    if units < n:
        raise ShardError(
            f"cannot split d_ff={cfg.d_ff} over {n} ranks on {ffn_align}-element block boundaries: "
            f"only {units} blocks; use fewer ranks"
        )
    hq, group = H // n, H // Hkv
    ranks = []
    for r in range(n):
        heads = (r * hq, (r + 1) * hq)
        # Whole KV groups when Hkv % n == 0; otherwise all of this rank's query heads share one KV head.
        kv = (heads[0] // group, (heads[1] - 1) // group + 1)
        ffn = (min(r * units // n * ffn_align, cfg.d_ff), min((r + 1) * units // n * ffn_align, cfg.d_ff))
        ranks.append(RankShard(r, heads, kv, ffn))
    return ShardPlan(n, cfg, tuple(ranks), kv_replicated=Hkv < n)


def plan_for(source: GGUFFile, n: int) -> ShardPlan:
    """A plan whose FFN split is aligned to the block size of the file's ffn_down tensors (evener than QK_K)."""
    align = max(
        (block_elems(t.qtype) for name, t in source.tensors.items() if name.endswith("ffn_down.weight")), default=QK_K
    )
    return plan(source.config, n, ffn_align=align)


def shard_config(cfg: ModelConfig, rank: int, p: ShardPlan) -> ModelConfig:
    """The config one rank's Model runs: its head and d_ff counts; d_model and head_dim unchanged."""
    s = p[rank]
    return dataclasses.replace(cfg, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, d_ff=s.d_ff)


# --- byte slicing ---------------------------------------------------------------------------------------------------
def slice_rows(info: TensorInfo, start: int, stop: int) -> TensorInfo:
    """Rows [start, stop) of a matrix: a plain range of the raw (rows, row_bytes) array, still memory-mapped."""
    if len(info.shape) != 2:
        raise ShardError(f"tensor {info.name}: a row split needs a matrix, got shape {info.shape}")
    if not 0 <= start < stop <= info.shape[0]:
        raise ShardError(f"tensor {info.name}: rows [{start}, {stop}) are out of range for shape {info.shape}")
    return TensorInfo(info.name, info.qtype, (stop - start, info.shape[1]), info.raw[start:stop])


def slice_cols(info: TensorInfo, start: int, stop: int) -> TensorInfo:
    """Columns [start, stop) of a matrix, or elements of a vector: the same byte range of every row, so both ends
    must fall on a block boundary of the tensor's type."""
    qt = GGMLQuantizationType(info.qtype)
    block, block_bytes = GGML_QUANT_SIZES[qt]
    cols = info.shape[-1]
    if not 0 <= start < stop <= cols:
        raise ShardError(f"tensor {info.name}: columns [{start}, {stop}) are out of range for shape {info.shape}")
    for edge in (start, stop):
        if edge % block:
            raise ShardError(
                f"tensor {info.name} ({qt.name}) cannot be split at column {edge}: {qt.name} stores "
                f"blocks of {block} elements, so splits must fall on multiples of {block}; "
                f"use fewer ranks or a model whose per-rank widths are multiples of {block}"
            )
    raw = info.raw if len(info.shape) == 2 else info.raw.reshape(1, -1)
    # A strided view of the memory map, not a copy: the backend copies one tensor at a time as it uploads it, so a
    # 70B shard costs no host memory beyond the mapped file (quant.dequantize and CuPy's upload take strided input).
    piece = raw[:, start // block * block_bytes : stop // block * block_bytes]
    if len(info.shape) == 1:
        return TensorInfo(info.name, info.qtype, (stop - start,), piece.reshape(-1))
    return TensorInfo(info.name, info.qtype, (info.shape[0], stop - start), piece)


def shard_tensor(info: TensorInfo, rank: int, p: ShardPlan) -> TensorInfo | None:
    """The part of a GGUF tensor that `rank` holds, chosen by the tensor's name; unknown names are replicated. None:
    the rank holds none of it (the bias of a row-parallel projection is added once, on rank 0, before the sum)."""
    s, hd = p[rank], p.cfg.head_dim
    kind = info.name.rsplit(".", 2)[-2:] if info.name.startswith("blk.") else []
    if not kind:
        return info  # token_embd, output, output_norm: replicated
    part, what = kind
    q_rows, kv_rows = (s.heads[0] * hd, s.heads[1] * hd), (s.kv_heads[0] * hd, s.kv_heads[1] * hd)
    if part == "attn_q":
        return slice_rows(info, *q_rows) if what == "weight" else slice_cols(info, *q_rows)  # bias: one row
    if part in ("attn_k", "attn_v"):
        return slice_rows(info, *kv_rows) if what == "weight" else slice_cols(info, *kv_rows)
    if part in ("attn_output", "ffn_down") and what == "bias":
        return info if rank == 0 else None
    if part == "attn_output":
        return slice_cols(info, *q_rows)
    if part in ("ffn_gate", "ffn_up"):
        return slice_rows(info, *s.ffn) if what == "weight" else slice_cols(info, *s.ffn)
    if part == "ffn_down":
        return slice_cols(info, *s.ffn)
    return info  # attn_norm, ffn_norm and anything else per layer: replicated


class ShardedFile:
    """One rank's view of a GGUF model, accepted by kiln.model.Model like a GGUFFile. All tensors are sliced here,
    before any reaches a device, so a model that cannot be split fails whole rather than half-loaded."""

    def __init__(self, source: GGUFFile | str, rank: int, shard_plan: ShardPlan | int):
        self.source = gguf_mod.load(source) if isinstance(source, str) else source
        self.plan = plan_for(self.source, shard_plan) if isinstance(shard_plan, int) else shard_plan
        if self.plan.cfg != self.source.config:
            raise ShardError("the shard plan was made for a different model config")
        self.rank, self.path = rank, self.source.path
        self.config = shard_config(self.source.config, rank, self.plan)
        shards = {name: shard_tensor(t, rank, self.plan) for name, t in self.source.tensors.items()}
        self.tensors = {name: t for name, t in shards.items() if t is not None}
        for name, shape in gguf_mod.expected_shapes(self.config, set(self.tensors)).items():  # guards the slicing
            if self.tensors[name].shape != shape:
                raise ShardError(
                    f"rank {rank}: shard of '{name}' has shape {self.tensors[name].shape}, expected {shape}"
                )
        arch, c = self.config.arch, self.config
        self.metadata = {
            **self.source.metadata,
            f"{arch}.attention.head_count": c.n_heads,
            f"{arch}.attention.head_count_kv": c.n_kv_heads,
            f"{arch}.feed_forward_length": c.d_ff,
            f"{arch}.attention.key_length": c.head_dim,
            f"{arch}.attention.value_length": c.head_dim,
            "kiln.tensor_parallel.rank": rank,
            "kiln.tensor_parallel.size": self.plan.n,
        }

    @property
    def file_size(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def chat_template(self) -> str | None:
        return self.source.chat_template

    def tokenizer_fields(self) -> dict:
        return self.source.tokenizer_fields()

    def close(self) -> None:
        self.tensors.clear()


# --- simulated tensor parallelism on the CPU ------------------------------------------------------------------------
class SimulatedTP:
    """n Models on n NumpyDevices run in lockstep threads; all_reduce is a Barrier-guarded sum through the device API
    (download, sum in rank order, write), the same data movement an NCCL all-reduce does, so the sharding is proven
    on the CPU before any GPU runs it. After a rank fails, the ranks' caches disagree: close() and start over."""

    def __init__(self, path: str, n: int, n_ctx: int | None = None, timeout: float = 60.0):
        from .model import Model
        from .runtime.numpy_backend import NumpyDevice
        from .session import Session

        source = gguf_mod.load(path)
        self.plan = plan_for(source, n)
        self.n, self.timeout = n, timeout
        self._barrier = threading.Barrier(n, timeout=timeout)
        self._parts: list[np.ndarray | None] = [None] * n
        files = [ShardedFile(source, r, self.plan) for r in range(n)]  # all shards first: fail before loading
        self.devices = [NumpyDevice() for _ in range(n)]
        self.models = [
            Model(f, dev, n_ctx=n_ctx, all_reduce=self._reducer(r, dev))
            for r, (f, dev) in enumerate(zip(files, self.devices))
        ]
        self.sessions = [Session(m) for m in self.models]  # the same tokens on every rank: the same Batch

    def _reducer(self, rank: int, dev):
        def all_reduce(t) -> None:
            self._parts[rank] = dev.download(t)
            self._barrier.wait()
            total = self._parts[0].copy()
            for part in self._parts[1:]:  # same order on every rank: bit-identical results everywhere
                total += part
            self._barrier.wait()  # nobody overwrites its part before every rank has summed
            dev.write(t, total)

        return all_reduce

    def _run(self, call) -> list[np.ndarray]:
        """call(session) on every rank concurrently; each rank's logits [1, vocab] as host arrays."""
        out: list[np.ndarray | None] = [None] * self.n
        errors: list[BaseException | None] = [None] * self.n

        def work(r: int) -> None:
            try:
                s = self.sessions[r]
                out[r] = s.dev.download(call(s))
            except BaseException as e:  # re-raised below; aborting the barrier frees ranks waiting on this one
                errors[r] = e
                self._barrier.abort()

        threads = [threading.Thread(target=work, args=(r,), name=f"tp-rank{r}") for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        first = next(
            (e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)),
            next((e for e in errors if e is not None), None),
        )
        if first is not None:
            self._barrier.reset()
            raise first
        return out  # type: ignore[return-value]

    def prefill(self, ids: list[int]) -> list[np.ndarray]:
        return self._run(lambda s: s.prefill(ids))

    def step(self, ids: list[int]) -> list[np.ndarray]:
        return self._run(lambda s: s.step(ids))

    def close(self) -> None:
        for s in self.sessions:
            s.close()
        for m in self.models:
            m.close()
        self.sessions, self.models = [], []


def run_simulated(path: str, n: int, ids: list[int], decode: int = 0, n_ctx: int | None = None) -> np.ndarray:
    """Prefill ids[:len(ids) - decode], then feed the last `decode` ids one at a time; rank 0's last-token logits of
    each step, shape (1 + decode, vocab). With decode=0 that is the [1, vocab] a single Model.forward returns."""
    if not 0 <= decode < len(ids):
        raise ShardError(f"decode={decode} must leave at least one prompt token of {len(ids)}")
    tp = SimulatedTP(path, n, n_ctx=n_ctx)
    try:
        split = len(ids) - decode
        rows = [tp.prefill(ids[:split])[0][0]]
        rows += [tp.step([t])[0][0] for t in ids[split:]]
        return np.stack(rows)
    finally:
        tp.close()
