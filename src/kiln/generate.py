"""Generation in three layers (as mlx-lm): generate_step yields token ids, stream_generate yields text chunks with
stop handling and timings, generate returns the whole text."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ContextOverflow, InvalidArgument, NonFiniteLogits
from .model import Model
from .sample import LogitsProcessor, Sampler, greedy, log_softmax
from .session import solo
from .tokenizer import StreamDecoder, Tokenizer


def generate_step(
    model: Model,
    prompt_ids: Sequence[int],
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    want_logits: bool = False,
) -> Iterator[tuple[int, np.ndarray | None]]:
    """Prefill the prompt, then yield (token, logits) until the context is full; the caller decides when to stop.

    `model` is a Model (its kiln.session.solo session runs the sequence) or a session-like object.
    Greedy decoding without processors stays on the device (Session.greedy): logits never cross to the host, and
    each token reaches the next step there, so the device need not wait for the host between tokens.
    """
    seq = solo(model)
    logits_t = seq.prefill(list(prompt_ids))
    if sampler is None and not logits_processors and not want_logits:
        _check_finite(seq.dev.download(logits_t)[0])  # once on this path: corrupt weights show at the prefill
        for token in seq.greedy(logits_t):
            yield token, None
        return
    tokens = list(prompt_ids)
    while True:
        logits = _check_finite(seq.dev.download(logits_t)[0].astype(np.float32))
        for proc in logits_processors:
            logits = proc(tokens, logits)
        token = sampler(logits) if sampler else greedy(logits)
        yield token, logits
        tokens.append(token)
        if len(seq.tokens) >= seq.n_ctx:
            return  # context full: the caller sees the generator end and reports finish_reason "length"
        logits_t = seq.step([token])


@dataclass
class Chunk:
    """One streamed piece of output. finish_reason is set on the last chunk: 'stop' (EOS/stop string) or 'length'."""

    text: str
    token: int | None
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


def _stop_hit(text: str, stops: Sequence[str]) -> int:
    """Index where the earliest stop string starts in text, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still be the start of a stop string (so we must not print them yet)."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:n]):
                keep = n
                break
    return keep


def stream_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    stop: Sequence[str] = (),
    logprobs: int = 0,
) -> Iterator[Chunk]:
    """Yield text as it is generated; stops on EOS, a stop string (not included in the text) or max_tokens."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise InvalidArgument("the prompt is empty: give some text (or token ids) to continue")
    bound = token_id_bound(model, tokenizer)
    bad = out_of_range_id(ids, bound)
    if bad is not None:
        raise InvalidArgument(f"prompt token id {bad} is out of range: ids must be in [0, {bound})")
    if len(ids) >= model.n_ctx:
        raise ContextOverflow(
            f"prompt has {len(ids)} tokens but the context holds {model.n_ctx}; shorten the prompt or raise --ctx"
        )
    text = TextStream(tokenizer, stop, max_tokens, len(ids))
    gen = generate_step(model, ids, sampler, logits_processors, want_logits=logprobs > 0)
    for token, logits in gen:
        lp, top = _logprobs(logits, token, logprobs)
        yield from text.feed(token, lp, top)
        if text.done:
            return
    yield text.end("length")


class TextStream:
    """Token ids in, Chunks out: detokenizes, holds back text that may start a stop string, and ends on EOS, a
    stop string (cut from the text) or max_tokens. Shared by stream_generate and the server's scheduled requests."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], max_tokens: int, prompt_tokens: int):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.stops = [s for s in stop if s]
        self.decoder = StreamDecoder(tokenizer)
        self.pending, self.n, self.done = "", 0, False
        self.t0 = time.perf_counter()
        self.t1 = self.t0
        self.stats: dict = {"prompt_tokens": prompt_tokens, "generation_tokens": 0, "prompt_tps": 0.0}
        self.stats["generation_tps"] = 0.0

    def feed(self, token: int, lp: float | None = None, top: dict | None = None) -> list[Chunk]:
        """The chunks token `token` completes (none while text is held back); self.done once it ended the text."""
        if self.n == 0:
            self.t1 = time.perf_counter()
            self.stats["prompt_tps"] = self.stats["prompt_tokens"] / max(self.t1 - self.t0, 1e-9)
        self.n += 1
        elapsed = time.perf_counter() - self.t1
        self.stats.update(generation_tokens=self.n, generation_tps=(self.n - 1) / max(elapsed, 1e-9))
        if token in self.tokenizer.eos_ids:
            return [self.end("stop")]
        self.pending += self.decoder.add(token)
        cut = _stop_hit(self.pending, self.stops)
        if cut >= 0:
            self.pending = self.pending[:cut]
            return [self.end("stop")]
        if self.n >= self.max_tokens:
            self.done = True
            text, self.pending = self.pending + self.decoder.flush(), ""
            return [Chunk(text, token, finish_reason="length", logprob=lp, top_logprobs=top, **self.stats)]
        hold = _held_back(self.pending, self.stops)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return [Chunk(out, token, logprob=lp, top_logprobs=top, **self.stats)]

    def end(self, reason: str) -> Chunk:
        """The last chunk: what is held back (a stop string's prefix that never completed is text too)."""
        self.done = True
        text, self.pending = self.pending, ""
        return Chunk(text, None, finish_reason=reason, **self.stats)


def _check_finite(logits: np.ndarray) -> np.ndarray:
    """NaN or Inf logits mean the weights overflow or are corrupt: say so rather than sample garbage from them."""
    if not np.isfinite(logits).all():
        raise NonFiniteLogits("the model produced NaN or infinite logits: its weights are corrupt or overflow float32")
    return logits


def token_id_bound(model: Model, tokenizer: Tokenizer) -> int:
    """Prompt ids must be below this: a row of the embedding (whose device kernel only clamps them), and decodable."""
    return min(model.cfg.vocab_size, tokenizer.vocab_size)


def out_of_range_id(ids: Sequence[int], bound: int) -> int | None:
    """The first id outside [0, bound), or None; checked where ids enter (stream_generate, the server)."""
    return next((t for t in ids if not 0 <= t < bound), None)


def _logprobs(logits: np.ndarray | None, token: int, k: int) -> tuple[float | None, dict[int, float] | None]:
    if logits is None or k <= 0:
        return None, None
    lp = log_softmax(logits)
    top = np.argsort(-lp)[:k]
    return float(lp[token]), {int(i): float(lp[i]) for i in top}


def generate(model: Model, tokenizer: Tokenizer, prompt: str | Sequence[int], **kwargs) -> str:
    return "".join(chunk.text for chunk in stream_generate(model, tokenizer, prompt, **kwargs))
