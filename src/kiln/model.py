"""The Llama forward pass (Llama 2/3, TinyLlama, SmolLM, Mistral; Qwen2 adds QKV bias), written once against the
backend ops of runtime/base.py. Shapes in comments: T tokens in the batch, d model width, Hq/Hkv heads, hd head dim.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .batch import Batch
from .errors import ContextOverflow, InvalidArgument
from .gguf import GGUFFile, ModelConfig
from .kv_cache import KVCache
from .runtime.base import Device, KVIndex, Tensor, Weight

BLOCK_SIZE = 16  # positions per KV-cache block

_MODEL_IDS = itertools.count()


@dataclass
class Layer:
    attn_norm: Weight
    wq: Weight
    wk: Weight
    wv: Weight
    wo: Weight
    ffn_norm: Weight
    w_gate: Weight
    w_up: Weight
    w_down: Weight
    bq: Weight | None = None  # optional biases (qwen2's Q/K/V; any of them in llama files that carry them)
    bk: Weight | None = None
    bv: Weight | None = None
    bo: Weight | None = None
    b_gate: Weight | None = None
    b_up: Weight | None = None
    b_down: Weight | None = None


def bucket(n: int) -> int:
    """The padded size of a batch dimension on a backend that records steps: powers of two to 128, then multiples
    of 128, so a few recorded shapes (CUDA graphs, WebGPU replays) cover every batch."""
    return 1 << max(0, n - 1).bit_length() if n <= 128 else -(-n // 128) * 128


def _seg(n: int) -> int:
    return -(-n // 64) * 64  # index segments start 256 bytes apart (the WebGPU binding rule for views)


class Activations:
    """Every intermediate tensor of a batch shape (T tokens, S sequences, R logits rows), allocated once and reused
    for each step of that shape. The batch's index vectors live in one i32 buffer, written once per step."""

    def __init__(self, dev: Device, cfg: ModelConfig, T: int, S: int, R: int, W: int):
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.T, self.S, self.R, self.W = T, S, R, W
        self.offsets = np.cumsum([0, _seg(T), _seg(T), _seg(T), _seg(R)])  # pos, slot, seq, rows, table
        self.index = dev.zeros((int(self.offsets[-1]) + S * W,), "i32")
        self.pos, self.slot, self.seq, self.rows = (
            dev.view(self.index, int(o), (n,)) for o, n in zip(self.offsets, (T, T, T, R))
        )
        self.table = dev.view(self.index, int(self.offsets[-1]), (S, W))
        self.ids = dev.empty((T,), "i32")
        self.x = dev.empty_for_all_reduce((T, cfg.d_model))  # residual stream
        self.h = dev.empty_for_all_reduce((T, cfg.d_model))  # normed input of each block, then its output
        self.q = dev.empty((T, q_dim))
        self.k = dev.empty((T, kv_dim))
        self.v = dev.empty((T, kv_dim))
        self.attn = dev.empty((T, q_dim))
        self.gate = dev.empty((T, cfg.d_ff))
        self.up = dev.empty((T, cfg.d_ff))
        self.last = dev.empty((R, cfg.d_model))
        self.logits = dev.empty((R, cfg.vocab_size))

    def owned(self) -> list[Tensor]:
        views = (self.pos, self.slot, self.seq, self.rows, self.table)
        return [t for t in vars(self).values() if isinstance(t, Tensor) and all(t is not v for v in views)]

    def write_index(self, dev: Device, batch: Batch, block_size: int) -> KVIndex:
        """Put the batch's positions, slots, sequence rows, logits rows and block tables on the device (padding
        tokens: position 0 of row 0, writing into the padding block) and return the attention op's view of them."""
        n, o = len(batch), self.offsets
        host = np.zeros(self.index.shape, np.int32)
        host[o[0] : o[0] + n] = batch.pos
        host[o[1] : o[1] + n] = batch.slot
        host[o[2] : o[2] + n] = batch.seq
        host[o[3] : o[3] + len(batch.logits)] = batch.logits
        table = host[o[4] :].reshape(self.S, self.W)
        for row, blocks in enumerate(batch.tables):
            table[row, : len(blocks)] = blocks
        dev.write(self.index, host)
        runs = tuple(batch.runs) + tuple((t, 1, 0) for t in range(n, self.T))
        return KVIndex(self.pos, self.slot, self.seq, self.table, block_size, runs, batch.max_kv)


class Model:
    """A loaded model on one device: weights and config, no per-sequence state. `forward(batch, cache)` runs one
    step of any mix of sequences; kiln.session.Session and kiln.scheduler.Scheduler decide what goes in it."""

    def __init__(self, gguf: GGUFFile, dev: Device, n_ctx: int | None = None, progress: bool = False, all_reduce=None):
        """n_ctx: the longest sequence (prompt and output) a cache made by make_cache() holds. all_reduce(tensor)
        sums a tensor across tensor-parallel ranks in place; None on a single device."""
        self.cfg, self.dev, self.gguf = gguf.config, dev, gguf
        self.all_reduce = all_reduce
        self.uid = next(_MODEL_IDS)  # names this model's recorded steps on the device (ids of dead objects recur)
        self.n_ctx = min(n_ctx or 4096, self.cfg.context_length)
        self._load_weights(gguf, progress)
        self._acts: dict[tuple[int, int, int, int], Activations] = {}
        self.on_close: list = []  # what else dies with the model (kiln.session.solo's session and its cache)

    def make_cache(self, n_tokens: int | None = None, block_size: int = BLOCK_SIZE) -> KVCache:
        """A paged KV cache of n_tokens positions in all (default: one sequence of n_ctx), sequences up to n_ctx."""
        n_tokens = n_tokens or self.n_ctx
        c = self.cfg
        n_blocks = -(-n_tokens // block_size) + 1  # and the padding block
        return KVCache(self.dev, c.n_layers, c.n_kv_heads, c.head_dim, n_blocks, block_size, self.n_ctx)

    def _load_weights(self, gguf: GGUFFile, progress: bool) -> None:
        infos = gguf.tensors
        self.dev.check_tensors(infos)
        bar = tqdm(
            total=sum(t.nbytes for t in infos.values()),
            unit="B",
            unit_scale=True,
            desc="loading weights",
            disable=not progress,
            leave=False,
        )

        def load(name: str) -> Weight:
            t = infos[name]
            w = self.dev.load_weight(name, t.qtype, t.raw, t.shape)
            bar.update(t.nbytes)
            return w

        def optional(name: str) -> Weight | None:
            return load(name) if name in infos else None

        self.tok_embd = load("token_embd.weight")
        self.output = self.tok_embd if self.cfg.tied_embeddings else load("output.weight")
        self.output_norm = load("output_norm.weight")
        self.layers = []
        for i in range(self.cfg.n_layers):
            p = f"blk.{i}."
            self.layers.append(
                Layer(
                    attn_norm=load(p + "attn_norm.weight"),
                    wq=load(p + "attn_q.weight"),
                    wk=load(p + "attn_k.weight"),
                    wv=load(p + "attn_v.weight"),
                    wo=load(p + "attn_output.weight"),
                    ffn_norm=load(p + "ffn_norm.weight"),
                    w_gate=load(p + "ffn_gate.weight"),
                    w_up=load(p + "ffn_up.weight"),
                    w_down=load(p + "ffn_down.weight"),
                    bq=optional(p + "attn_q.bias"),
                    bk=optional(p + "attn_k.bias"),
                    bv=optional(p + "attn_v.bias"),
                    bo=optional(p + "attn_output.bias"),
                    b_gate=optional(p + "ffn_gate.bias"),
                    b_up=optional(p + "ffn_up.bias"),
                    b_down=optional(p + "ffn_down.bias"),
                )
            )
        bar.close()

    def weights(self) -> list[Weight]:
        ws = [self.tok_embd, self.output_norm] + ([] if self.output is self.tok_embd else [self.output])
        for layer in self.layers:
            ws += [w for w in vars(layer).values() if w is not None]
        return ws

    # --- forward ------------------------------------------------------------------------------------------------
    def forward(self, batch: Batch, cache: KVCache) -> Tensor:
        """Run one step and return the logits [R, vocab] on the device: row i is the logits of token
        batch.logits[i] (rows past len(batch.logits) are padding)."""
        if not batch.ids:
            raise InvalidArgument("a batch needs at least one token")
        if not batch.logits:  # a step of unfinished prompt chunks: one row anyway, so every shape has an output
            batch.logits.append(len(batch.ids) - 1)
        if batch.max_kv > cache.max_seq_len:
            raise ContextOverflow(f"{batch.max_kv} tokens do not fit the context of {cache.max_seq_len} tokens")
        a = self.acts(len(batch), len(batch.tables), len(batch.logits), cache.table_width)
        self.dev.write(a.ids, np.pad(np.asarray(batch.ids, np.int32), (0, a.T - len(batch))))
        self.run(a, batch, cache)
        return a.logits

    def run(self, a: Activations, batch: Batch, cache: KVCache) -> None:
        """The step whose token ids are already in a.ids on the device (Session.greedy feeds them there)."""
        kv = a.write_index(self.dev, batch, cache.block_size)
        shape = "decode" if kv.decode else kv.runs  # a recorded step's kernels depend on the runs unless all are 1
        key = (self.uid, cache.uid, a.T, a.S, a.R, shape)
        self.dev.replay(key, lambda: self._forward(a, cache, kv))

    def acts(self, T: int, S: int, R: int, W: int) -> Activations:
        """The activation set of a batch shape, padded to buckets on backends that record steps. Decode shapes
        (T = S = R) keep their sets for good (their recorded steps stay valid); other shapes keep the last two."""
        if self.dev.records_steps:
            T, S, R = bucket(T), bucket(S), bucket(R)
        key = (T, S, R, W)
        if key not in self._acts:
            others = [k for k in self._acts if not k[0] == k[1] == k[2]]
            if not T == S == R and len(others) >= 2:
                self._free_acts(self._acts.pop(others[0]))
            self._acts[key] = Activations(self.dev, self.cfg, T, S, R, W)
        return self._acts[key]

    def _free_acts(self, acts: Activations) -> None:
        for t in acts.owned():
            self.dev.free(t)

    def _forward(self, a: Activations, cache: KVCache, kv: KVIndex) -> None:
        dev, c = self.dev, self.cfg
        dev.embed(self.tok_embd, a.ids, a.x)  # x: [T, d]
        for i, L in enumerate(self.layers):
            dev.rms_norm(a.x, L.attn_norm, c.norm_eps, a.h)
            dev.matmul(a.h, L.wq, a.q, L.bq)  # q: [T, Hq*hd]
            dev.matmul(a.h, L.wk, a.k, L.bk)  # k, v: [T, Hkv*hd]
            dev.matmul(a.h, L.wv, a.v, L.bv)
            dev.rope(a.q, kv.pos, c.n_heads, c.head_dim, c.rope)
            dev.rope(a.k, kv.pos, c.n_kv_heads, c.head_dim, c.rope)
            dev.attention(a.q, a.k, a.v, cache.k[i], cache.v[i], kv, a.attn, c.n_heads, c.n_kv_heads, c.head_dim)
            dev.matmul(a.attn, L.wo, a.h, L.bo)  # h: [T, d]
            self._reduce(a.h)
            dev.add(a.x, a.h, a.x)
            dev.rms_norm(a.x, L.ffn_norm, c.norm_eps, a.h)
            dev.matmul(a.h, L.w_gate, a.gate, L.b_gate)  # gate, up: [T, d_ff]
            dev.matmul(a.h, L.w_up, a.up, L.b_up)
            dev.swiglu(a.gate, a.up, a.gate)
            dev.matmul(a.gate, L.w_down, a.h, L.b_down)
            self._reduce(a.h)
            dev.add(a.x, a.h, a.x)
        dev.gather_rows(a.x, a.rows, a.last)  # only the rows asked for go through the output head
        dev.rms_norm(a.last, self.output_norm, c.norm_eps, a.last)
        dev.matmul(a.last, self.output, a.logits)  # logits: [R, vocab]

    def _reduce(self, t: Tensor) -> None:
        if self.all_reduce is not None:  # tensor parallel: each rank holds a partial sum of the block's output
            self.all_reduce(t)

    def close(self) -> None:
        """Give the model's device objects back: activations and weights (caches are closed by their owners)."""
        while self.on_close:
            self.on_close.pop()()
        for acts in self._acts.values():
            self._free_acts(acts)
        self._acts.clear()
        for w in self.weights():
            self.dev.free_weight(w)
        self.layers = []
