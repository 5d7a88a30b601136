"""The Llama forward pass (Llama 2/3, TinyLlama, SmolLM, Mistral; Qwen2 adds QKV bias), written once against the
backend ops of runtime/base.py. Shapes in comments: T tokens in the batch, d model width, Hq/Hkv heads, hd head dim.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .errors import ContextOverflow, InvalidArgument
from .gguf import GGUFFile, ModelConfig
from .runtime.base import Device, Tensor, Weight

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


class Activations:
    """Every intermediate tensor for a batch of T tokens, allocated once and reused for each step of that size."""

    def __init__(self, dev: Device, cfg: ModelConfig, T: int):
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.T = T
        self.ids = dev.empty((T,), "i32")
        self.pos = dev.empty((T,), "i32")
        self.x = dev.empty_for_all_reduce((T, cfg.d_model))  # residual stream
        self.h = dev.empty_for_all_reduce((T, cfg.d_model))  # normed input of each block, then its output
        self.q = dev.empty((T, q_dim))
        self.k = dev.empty((T, kv_dim))
        self.v = dev.empty((T, kv_dim))
        self.attn = dev.empty((T, q_dim))
        self.gate = dev.empty((T, cfg.d_ff))
        self.up = dev.empty((T, cfg.d_ff))
        self.last = dev.empty((1, cfg.d_model))
        self.logits = dev.empty((1, cfg.vocab_size))

    def tensors(self) -> list[Tensor]:
        return [t for t in vars(self).values() if isinstance(t, Tensor)]


class Model:
    """A loaded model on one device, with its KV cache. Not thread-safe: one generation at a time."""

    def __init__(self, gguf: GGUFFile, dev: Device, n_ctx: int | None = None, progress: bool = False, all_reduce=None):
        """all_reduce(tensor) sums a tensor across tensor-parallel ranks in place; None on a single device."""
        self.cfg, self.dev, self.gguf = gguf.config, dev, gguf
        self.all_reduce = all_reduce
        self.uid = next(_MODEL_IDS)  # names this model's recorded steps on the device (ids of dead objects recur)
        self.n_ctx = min(n_ctx or 4096, self.cfg.context_length)
        self._load_weights(gguf, progress)
        cache_shape = (self.cfg.n_kv_heads, self.n_ctx, self.cfg.head_dim)
        self.k_cache = [dev.zeros(cache_shape, dev.kv_dtype) for _ in range(self.cfg.n_layers)]
        self.v_cache = [dev.zeros(cache_shape, dev.kv_dtype) for _ in range(self.cfg.n_layers)]
        self._acts: dict[int, Activations] = {}
        self.tokens: list[int] = []  # what the KV cache holds, position by position

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
    def acts(self, T: int) -> Activations:
        """Decode (T=1) keeps its set for good; a new prompt size returns the previous prompt size's set to the pool
        first. Decode does not: freeing the prompt's set would drop its captured graph, and the next prompt of the same
        size would run eagerly and be captured again."""
        if T not in self._acts:
            if T != 1:
                for old in [n for n in self._acts if n != 1]:
                    self._free_acts(self._acts.pop(old))
            self._acts[T] = Activations(self.dev, self.cfg, T)
        return self._acts[T]

    def _free_acts(self, acts: Activations) -> None:
        for t in acts.tensors():
            self.dev.free(t)

    def forward(self, ids: list[int], start: int) -> Tensor:
        """Run tokens `ids` at positions start.. and return the last token's logits [1, vocab] (on the device)."""
        T = len(ids)
        if start + T > self.n_ctx:
            raise ContextOverflow(f"{start + T} tokens do not fit the context of {self.n_ctx} tokens")
        a = self.acts(T)
        self.dev.write(a.ids, np.asarray(ids, np.int32))
        self._run(a, start)
        return a.logits

    def _run(self, a: Activations, start: int) -> None:
        """The step of a.T tokens at positions start.. whose ids are already in a.ids on the device."""
        self.dev.write(a.pos, np.arange(start, start + a.T, dtype=np.int32))
        self.dev.replay((self.uid, "forward", a.T), lambda: self._forward(a, n_kv=start + a.T))

    def _forward(self, a: Activations, n_kv: int) -> None:
        dev, c = self.dev, self.cfg
        dev.embed(self.tok_embd, a.ids, a.x)  # x: [T, d]
        for i, L in enumerate(self.layers):
            dev.rms_norm(a.x, L.attn_norm, c.norm_eps, a.h)
            dev.matmul(a.h, L.wq, a.q, L.bq)  # q: [T, Hq*hd]
            dev.matmul(a.h, L.wk, a.k, L.bk)  # k, v: [T, Hkv*hd]
            dev.matmul(a.h, L.wv, a.v, L.bv)
            dev.rope(a.q, a.pos, c.n_heads, c.head_dim, c.rope)
            dev.rope(a.k, a.pos, c.n_kv_heads, c.head_dim, c.rope)
            dev.attention(
                a.q,
                a.k,
                a.v,
                self.k_cache[i],
                self.v_cache[i],
                a.pos,
                a.attn,
                c.n_heads,
                c.n_kv_heads,
                c.head_dim,
                n_kv,
            )
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
        dev.copy_row(a.x, a.T - 1, a.last)  # only the last token needs logits
        dev.rms_norm(a.last, self.output_norm, c.norm_eps, a.last)
        dev.matmul(a.last, self.output, a.logits)  # logits: [1, vocab]

    def _reduce(self, t: Tensor) -> None:
        if self.all_reduce is not None:  # tensor parallel: each rank holds a partial sum of the block's output
            self.all_reduce(t)

    # --- KV-cache bookkeeping -----------------------------------------------------------------------------------
    def prefill(self, ids: list[int], chunk: int = 512) -> Tensor:
        """Feed `ids` after reusing the longest prefix already in the cache; returns the last logits."""
        if len(ids) == 0:
            raise InvalidArgument("cannot run an empty prompt")
        if len(ids) > self.n_ctx:
            raise ContextOverflow(
                f"prompt has {len(ids)} tokens but the context holds {self.n_ctx}; shorten the prompt or raise --ctx"
            )
        keep = _common_prefix(self.tokens, ids)
        keep = min(keep, len(ids) - 1)  # always run at least one token to get logits
        self.tokens = list(ids[:keep])
        logits = None
        for s in range(keep, len(ids), chunk):
            logits = self.step(ids[s : s + chunk])
        return logits

    def step(self, ids: list[int]) -> Tensor:
        logits = self.forward(ids, len(self.tokens))
        self.tokens.extend(ids)
        return logits

    def greedy(self, logits: Tensor) -> Iterator[int]:
        """Greedy tokens from `logits` on, until the context is full. Each token reaches the next step on the device
        (Device.argmax_into), so where the backend allows, the device runs step t + 1 while the host waits for
        token t: one step runs ahead of the tokens taken. A token is in self.tokens once the step that reads it has
        started, so self.tokens and the cache agree whenever the caller stops; the token that step computes is then
        dropped."""
        a = self.acts(1)
        pending = self.dev.argmax_into(logits, a.ids)
        while len(self.tokens) < self.n_ctx:
            self._run(a, len(self.tokens))
            ahead = self.dev.argmax_into(a.logits, a.ids)
            token = self.dev.read_token(pending)
            self.tokens.append(token)
            yield token
            pending = ahead
        yield self.dev.read_token(pending)

    def reset(self) -> None:
        self.tokens = []

    def close(self) -> None:
        """Give every device object back: activations, caches, weights."""
        for acts in self._acts.values():
            self._free_acts(acts)
        self._acts.clear()
        for t in self.k_cache + self.v_cache:
            self.dev.free(t)
        self.k_cache, self.v_cache = [], []
        for w in self.weights():
            self.dev.free_weight(w)
        self.layers = []


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
