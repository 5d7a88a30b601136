"""One sequence over a model: the client that `kiln run/chat`, `kiln bench` and kiln.generate use. It builds the same
Batch records the scheduler does and keeps its own paged KV cache, so a new prompt reuses what the cache holds:
all of it when the prompt extends the last one (the next chat turn), else its full blocks through the prefix cache.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

from .batch import Batch
from .errors import ContextOverflow, InvalidArgument
from .kv_cache import CachedSeq
from .model import Model
from .runtime.base import Tensor

_SOLO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Session:
    """Not thread-safe: one generation at a time (the server's scheduler serves many)."""

    def __init__(self, model: Model):
        self.model, self.dev, self.n_ctx = model, model.dev, model.n_ctx
        self.cache = model.make_cache(model.n_ctx)
        self.seq = CachedSeq()

    @property
    def tokens(self) -> list[int]:
        """What the KV cache holds for this sequence, position by position."""
        return self.seq.tokens

    def reset(self) -> None:
        self.cache.close_seq(self.seq)

    def rewind(self, n_tokens: int) -> None:
        """Forget every token after the first n_tokens (benchmarks re-run the same steps this way)."""
        self.cache.rewind(self.seq, n_tokens)

    def prefill(self, ids: list[int], chunk: int = 512) -> Tensor:
        """Feed `ids` after reusing what the cache already holds of them; returns the last token's logits [1, vocab]
        (row 0 of the tensor, on the device)."""
        if len(ids) == 0:
            raise InvalidArgument("cannot run an empty prompt")
        if len(ids) > self.n_ctx:
            raise ContextOverflow(
                f"prompt has {len(ids)} tokens but the context holds {self.n_ctx}; shorten the prompt or raise --ctx"
            )
        held = self.seq.tokens
        if not (len(held) < len(ids) and ids[: len(held)] == held):  # not a plain continuation: start over
            self.cache.close_seq(self.seq)
            self.seq = self.cache.open(list(ids))
        logits = None
        for s in range(len(self.seq.tokens), len(ids), chunk):
            logits = self.step(ids[s : s + chunk])
        return logits

    def step(self, ids: list[int]) -> Tensor:
        """Run `ids` after the tokens held; returns the last one's logits."""
        start = len(self.seq.tokens)
        if start + len(ids) > self.n_ctx:
            raise ContextOverflow(f"{start + len(ids)} tokens do not fit the context of {self.n_ctx} tokens")
        self._reserve(start + len(ids))
        batch = Batch()
        batch.add(self.cache, self.seq, ids, start, want_logits=True)
        logits = self.model.forward(batch, self.cache)
        self.cache.commit(self.seq, list(ids))
        return logits

    def _reserve(self, n_tokens: int) -> None:
        if not self.cache.reserve(self.seq, n_tokens):
            raise RuntimeError(f"the session's KV cache cannot hold {n_tokens} tokens")  # sized for n_ctx: a bug

    def greedy(self, logits: Tensor) -> Iterator[int]:
        """Greedy tokens from `logits` on, until the context is full. Each token reaches the next step on the device
        (Device.argmax_into), so where the backend allows, the device runs step t + 1 while the host waits for
        token t: one step runs ahead of the tokens taken. A token is in self.tokens once the step that reads it has
        started, so self.tokens and the cache agree whenever the caller stops; the token that step computes is then
        dropped."""
        a = self.model.acts(1, 1, 1, self.cache.table_width)
        pending = self.dev.argmax_into(logits, a.ids)
        while len(self.seq.tokens) < self.n_ctx:
            n = len(self.seq.tokens)
            self._reserve(n + 1)
            batch = Batch()
            batch.add(self.cache, self.seq, [0], n, want_logits=True)  # its id is already in a.ids on the device
            self.model.run(a, batch, self.cache)
            ahead = self.dev.argmax_into(a.logits, a.ids)
            token = self.dev.read_tokens(pending)[0]
            self.cache.commit(self.seq, [token])
            yield token
            pending = ahead
        yield self.dev.read_tokens(pending)[0]

    def close(self) -> None:
        self.cache.close_seq(self.seq)
        self.cache.close()


def solo(model) -> Session:
    """The model's own one-sequence session (made on first use, closed with the model): what kiln.generate drives
    when given a Model. A model that is its own session (tp.TensorParallelModel) is returned as it is."""
    if not isinstance(model, Model):
        return model
    session = _SOLO.get(model)
    if session is None:
        session = _SOLO[model] = Session(model)

        def close() -> None:  # the entry refers to its own key: drop it, or the model (and device) never die
            _SOLO.pop(model, None)
            session.close()

        model.on_close.append(close)
    return session
