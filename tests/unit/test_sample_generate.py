"""Samplers on their own, and generation's stop handling (EOS, stop strings, max tokens) on a tiny model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

import kiln
from kiln.errors import InvalidArgument
from kiln.generate import _held_back, _stop_hit
from kiln.sample import make_logits_processors, make_sampler, presence_frequency_penalty, repetition_penalty


def test_temperature_zero_is_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0], np.float32)
    assert make_sampler(0.0)(logits) == 1


def test_top_k_one_is_greedy_at_any_temperature():
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    sample = make_sampler(temperature=5.0, top_k=1, seed=1)
    assert all(sample(logits) == int(np.argmax(logits)) for _ in range(20))


def test_top_p_and_min_p_cut_the_tail():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float64)).astype(np.float32)
    top_p = make_sampler(temperature=1.0, top_p=0.7, seed=0)
    assert {top_p(logits) for _ in range(300)} == {0, 1}
    min_p = make_sampler(temperature=1.0, min_p=0.25, seed=0)  # keeps p >= 0.125
    assert {min_p(logits) for _ in range(300)} == {0, 1, 2}


def test_sampling_follows_the_distribution_and_seed():
    logits = np.log(np.array([0.6, 0.3, 0.1])).astype(np.float32)
    sample = make_sampler(1.0, seed=7)
    counts = np.bincount([sample(logits) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.6, 0.3, 0.1], atol=0.03)
    assert make_sampler(1.0, seed=7)(logits) == make_sampler(1.0, seed=7)(logits)


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"min_p": 1.0}])
def test_invalid_sampler_settings_raise(kwargs):
    with pytest.raises(InvalidArgument):
        make_sampler(**kwargs)


def test_repetition_penalty_llama_cpp_rule():
    logits = np.array([2.0, -2.0, 1.0], np.float32)
    out = repetition_penalty(2.0)([0, 1], logits.copy())
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0])


def test_presence_frequency_penalty_counts_generated_tokens_only():
    logits = np.zeros(4, np.float32)
    out = presence_frequency_penalty(0.5, 0.25, start=2)([3, 3, 1, 1, 2], logits)
    np.testing.assert_allclose(out, [0.0, -1.0, -0.75, 0.0])
    assert make_logits_processors() == []


def test_stop_string_helpers():
    assert _stop_hit("hello wor", ["world"]) == -1
    assert _held_back("hello wor", ["world"]) == 3
    assert _stop_hit("hello world!", ["xx", "world"]) == 6
    assert _held_back("abc", ["zz"]) == 0


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return kiln.load(tiny_models(Q.Q8_0), backend="numpy")


def test_max_tokens_and_finish_reason(tiny):
    chunks = list(kiln.stream_generate(tiny, tiny.tokenizer, "hello", max_tokens=5))
    assert chunks[-1].finish_reason in ("length", "stop")
    assert chunks[-1].generation_tokens <= 5
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_stop_string_is_cut_and_not_returned(tiny):
    full = kiln.generate(tiny, tiny.tokenizer, "hello", max_tokens=12)
    if len(full) < 4:
        pytest.skip("the random model stopped too early for this check")
    stop = full[2:4]
    text = kiln.generate(tiny, tiny.tokenizer, "hello", max_tokens=12, stop=[stop])
    assert text == full[: full.index(stop)]


def test_greedy_generation_is_deterministic_and_reuses_the_cache(tiny):
    a = kiln.generate(tiny, tiny.tokenizer, "abc abc", max_tokens=8)
    b = kiln.generate(tiny, tiny.tokenizer, "abc abc", max_tokens=8)
    assert a == b


def test_logprobs_are_reported(tiny):
    chunks = list(kiln.stream_generate(tiny, tiny.tokenizer, "hi", max_tokens=3, logprobs=2))
    scored = [c for c in chunks if c.token is not None]
    assert scored and all(c.logprob <= 0 and len(c.top_logprobs) == 2 for c in scored)


def test_chat_session_with_reset_and_exit(tiny_models):
    """`kiln chat` in a real process: two turns, /reset, /exit."""
    proc = subprocess.run(
        [sys.executable, "-m", "kiln", "chat", "--model", tiny_models(Q.Q8_0), "--backend", "numpy", "-n", "4"],
        input="hello\nagain\n/reset\nnew\n/exit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "history cleared" in proc.stderr
    assert proc.stdout.count(">>> ") == 5  # one prompt per input line
