"""Continuous batching: requests in, one Batch per step out. Each step carries one decode token for every running
sequence and, under a token budget, prompt chunks of sequences still prefilling; waiting requests are admitted
in arrival order while the KV cache has blocks for their prompt. When the blocks run out mid-decode, the youngest
running sequence is preempted: its blocks go back (its full ones stay in the prefix cache) and it is recomputed
from its prompt and the tokens it had produced when readmitted. Each row samples with its own settings.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .batch import Batch
from .errors import InvalidArgument, NonFiniteLogits
from .kv_cache import CachedSeq, KVCache
from .model import Model
from .sample import LogitsProcessor, greedy, log_softmax

_IDS = itertools.count()


@dataclass(eq=False)
class Request:
    """One sequence to generate. `sampler(logits) -> id` (None: greedy on the device); processors see the prompt
    and the output so far. Output appears in `output`; `finish` is set when it ends: 'stop' (a stop id),
    'length' (max_tokens or the context), 'cancelled', or 'error'."""

    prompt: list[int]
    max_tokens: int
    stop_ids: frozenset[int] = frozenset()
    sampler: Callable[[np.ndarray], int] | None = None
    processors: Sequence[LogitsProcessor] = ()
    logprobs: int = 0
    after: Request | None = None  # admitted only once this one has its prompt in the cache (n choices share it)
    id: int = field(default_factory=lambda: next(_IDS))
    output: list[int] = field(default_factory=list)
    finish: str | None = None
    error: str | None = None
    seq: CachedSeq | None = None
    computed: int = 0  # tokens of `todo` whose K/V are in the cache
    todo: list[int] = field(default_factory=list)  # what the cache must hold before the next token: prompt + output
    prompt_cached: int = 0  # prompt tokens the prefix cache supplied at the first admission
    preemptions: int = 0

    @property
    def greedy_on_device(self) -> bool:
        return self.sampler is None and not self.processors and not self.logprobs


@dataclass
class Event:
    """What a step produced for one request: a token (with its logprob and top logprobs if asked), and/or the end."""

    request: Request
    token: int | None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish: str | None = None


class Scheduler:
    """Not thread-safe: one thread calls add/cancel/step (kiln.engine.Engine runs it on its own thread)."""

    def __init__(self, model: Model, cache: KVCache, max_seqs: int = 64, token_budget: int = 512):
        if max_seqs < 1 or token_budget < 1:
            raise InvalidArgument("max_seqs and token_budget must be at least 1")
        self.model, self.cache = model, cache
        self.max_seqs, self.token_budget = max_seqs, max(token_budget, max_seqs)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in arrival order: the last one is the youngest
        self.steps = self.preempted = 0

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, req: Request) -> None:
        if not req.prompt:
            raise InvalidArgument("the prompt is empty")
        if len(req.prompt) >= self.cache.max_seq_len:
            raise InvalidArgument(f"prompt has {len(req.prompt)} tokens but the context holds {self.cache.max_seq_len}")
        if -(-(len(req.prompt) + 1) // self.cache.block_size) > self.cache.blocks.n_blocks - 1:
            raise InvalidArgument("the prompt does not fit the KV cache; raise its size (--kv-tokens)")
        req.todo = list(req.prompt)
        self.waiting.append(req)

    def cancel(self, req: Request) -> Event | None:
        """End a request now (client gone, stop string seen); its blocks go back at once."""
        if req.finish is not None:
            return None
        if req in self.waiting:
            self.waiting.remove(req)
        return self._finish(req, "cancelled")

    # --- one step -----------------------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """Run one forward over the running sequences and newly admitted ones; returns what each produced."""
        decode = self._decoding()
        prefill = self._prefilling(self.token_budget - len(decode))
        if not decode and not prefill:
            return []
        batch, rows = Batch(), []
        for req in decode:
            n = len(req.todo) - 1
            rows.append((req, batch.add(self.cache, req.seq, req.todo[n:], n, want_logits=True), 1))
        for req, n in prefill:
            last = req.computed + n == len(req.todo)
            row = batch.add(self.cache, req.seq, req.todo[req.computed : req.computed + n], req.computed, last)
            rows.append((req, row, n))
        logits = self.model.forward(batch, self.cache)
        self.steps += 1
        return self._take(rows, logits)

    def _decoding(self) -> list[Request]:
        """Running sequences whose prompt is in the cache: each takes one token, for which it needs a slot. When
        the pool is out of blocks the youngest running sequence is preempted until it is not."""
        out = []
        for req in list(self.running):
            if req.finish is not None or req.computed < len(req.todo) - 1 or req not in self.running:
                continue
            while not self.cache.reserve(req.seq, len(req.todo)):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            if req in self.running:
                out.append(req)
        return out

    def _prefilling(self, budget: int) -> list[tuple[Request, int]]:
        """Prompt chunks under the budget: sequences part-way through their prompt first, then newly admitted ones
        (in arrival order, while their whole prompt's blocks are free: a later request never jumps the queue)."""
        out = []
        for req in self.running:
            left = len(req.todo) - req.computed
            if req.computed < len(req.todo) - 1 and budget > 0:
                n = min(left, budget)
                out.append((req, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            req = self.waiting[0]
            first = req.after
            if first is not None and first.finish is None and first.computed < len(first.prompt):
                break  # its sibling is still prefilling the prompt they share
            seq = self.cache.open(req.todo)
            if not self.cache.reserve(seq, len(req.todo) + 1):
                self.cache.close_seq(seq)
                break
            self.waiting.popleft()
            req.seq, req.computed = seq, len(seq.tokens)
            if not req.preemptions:
                req.prompt_cached = seq.reused
            self.running.append(req)
            n = min(len(req.todo) - req.computed, budget)
            out.append((req, n))
            budget -= n
        return out

    def _preempt(self, req: Request) -> None:
        self.cache.close_seq(req.seq)
        self.running.remove(req)
        req.seq, req.computed = None, 0
        req.preemptions += 1
        self.preempted += 1
        self.waiting.appendleft(req)  # the youngest running is older than anything waiting

    # --- sampling -----------------------------------------------------------------------------------------------
    def _take(self, rows: list[tuple[Request, int, int]], logits_t) -> list[Event]:
        wanted = [(req, row) for req, row, _ in rows if row >= 0]
        on_device = all(req.greedy_on_device for req, _ in wanted)
        dev = self.model.dev
        if on_device:
            ids = dev.argmax_rows(logits_t)
            host = None
        else:
            host = dev.download(logits_t).astype(np.float32)
            ids = None
        events = []
        for req, row, n in rows:
            self.cache.commit(req.seq, req.todo[req.computed : req.computed + n])
            req.computed += n
            if row < 0:
                continue
            if host is None:
                events.append(self._emit(req, int(ids[row])))
                continue
            lg = host[row]
            if not np.isfinite(lg).all():
                events.append(self._fail(req, NonFiniteLogits("the model produced NaN or infinite logits")))
                continue
            for proc in req.processors:
                lg = proc(req.prompt + req.output, lg)
            token = req.sampler(lg) if req.sampler else greedy(lg)
            lp, top = None, None
            if req.logprobs:
                ls = log_softmax(lg)
                lp = float(ls[token])
                top = {int(i): float(ls[i]) for i in np.argsort(-ls)[: req.logprobs]}
            events.append(self._emit(req, token, lp, top))
        return events

    def _emit(self, req: Request, token: int, lp=None, top=None) -> Event:
        req.output.append(token)
        req.todo.append(token)
        ev = Event(req, token, lp, top)
        if token in req.stop_ids:
            ev.finish = "stop"
        elif len(req.output) >= req.max_tokens or len(req.todo) > self.cache.max_seq_len:  # no room for its K/V
            ev.finish = "length"
        if ev.finish:
            self._finish(req, ev.finish)
        return ev

    def _fail(self, req: Request, err: Exception) -> Event:
        req.error = str(err)
        return self._finish(req, "error")

    def _finish(self, req: Request, reason: str) -> Event:
        req.finish = reason
        if req.seq is not None:
            self.cache.close_seq(req.seq)
            req.seq = None
        if req in self.running:
            self.running.remove(req)
        return Event(req, None, finish=reason)
