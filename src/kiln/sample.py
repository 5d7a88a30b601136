"""Samplers and logits processors as small closures over NumPy logits (mlx-lm style), usable on their own.

A sampler maps logits [vocab] -> token id; a logits processor maps (tokens so far, logits) -> logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .errors import InvalidArgument

Sampler = Callable[[np.ndarray], int]
LogitsProcessor = Callable[[Sequence[int], np.ndarray], np.ndarray]


_LOWEST, _HIGHEST = float(np.finfo(np.float32).min), float(np.finfo(np.float32).max)


def finite(logits: np.ndarray) -> np.ndarray:
    """NaN -> the lowest float32, +-inf -> the largest ones: every later exp/argmax/log stays finite, a NaN logit is
    never picked unless all are, and several +inf ties share the top. (A penalty or a broken model can make them.)"""
    return np.nan_to_num(logits, nan=_LOWEST, posinf=_HIGHEST, neginf=_LOWEST)


def greedy(logits: np.ndarray) -> int:
    return int(np.argmax(finite(logits)))  # np.argmax alone returns the first NaN


def make_sampler(
    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed: int | None = None
) -> Sampler:
    """temperature 0 is greedy. Filters apply in llama.cpp's order: top-k, top-p, min-p, then temperature."""
    if temperature < 0:
        raise InvalidArgument("temperature must be >= 0")
    if not 0.0 < top_p <= 1.0:
        raise InvalidArgument("top_p must be in (0, 1]")
    if not 0.0 <= min_p < 1.0:
        raise InvalidArgument("min_p must be in [0, 1)")
    if temperature == 0:
        return greedy
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> int:
        logits = finite(logits)
        ids = np.argsort(-logits, kind="stable")
        if top_k > 0:
            ids = ids[:top_k]
        z = logits[ids].astype(np.float64)
        probs = np.exp(z - z[0])
        probs /= probs.sum()
        if top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), top_p) + 1)
            ids, z = ids[:keep], z[:keep]
        if min_p > 0.0:
            keep_mask = np.exp(z - z[0]) >= min_p
            ids, z = ids[keep_mask], z[keep_mask]
        p = np.exp((z - z[0]) / temperature)
        return int(ids[rng.choice(len(ids), p=p / p.sum())])

    return sample


def repetition_penalty(penalty: float, last_n: int = 64) -> LogitsProcessor:
    """llama.cpp's rule: divide positive logits of recent tokens by the penalty, multiply negative ones."""

    def process(tokens: Sequence[int], logits: np.ndarray) -> np.ndarray:
        recent = np.unique(np.asarray(tokens[-last_n:], dtype=np.int64)) if last_n else np.array([], np.int64)
        if recent.size:
            vals = logits[recent]
            logits[recent] = np.where(vals > 0, vals / penalty, vals * penalty)
        return logits

    return process


def presence_frequency_penalty(presence: float, frequency: float, start: int = 0) -> LogitsProcessor:
    """OpenAI's penalties over generated tokens (tokens[start:]): -presence once, -frequency per occurrence."""

    def process(tokens: Sequence[int], logits: np.ndarray) -> np.ndarray:
        generated = np.asarray(tokens[start:], dtype=np.int64)
        if generated.size:
            ids, counts = np.unique(generated, return_counts=True)
            logits[ids] -= presence + frequency * counts
        return logits

    return process


def make_logits_processors(
    repeat_penalty: float = 1.0,
    repeat_last_n: int = 64,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    prompt_len: int = 0,
) -> list[LogitsProcessor]:
    procs: list[LogitsProcessor] = []
    if repeat_penalty != 1.0:
        procs.append(repetition_penalty(repeat_penalty, repeat_last_n))
    if presence_penalty or frequency_penalty:
        procs.append(presence_frequency_penalty(presence_penalty, frequency_penalty, prompt_len))
    return procs


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = finite(logits)
    z = logits.astype(np.float64) - logits.max()
    return z - np.log(np.exp(z).sum())
