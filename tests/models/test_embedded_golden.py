"""The embedded SmolLM2 on the NumPy reference reproduces HF transformers' greedy tokens (tests/data, made by
tools/make_goldens.py) for 48 tokens on 3 chat prompts, and its answers are the same English text."""

from __future__ import annotations

import json
import os

import pytest

import kiln

GOLDENS = json.load(open(os.path.join(os.path.dirname(__file__), "..", "data", "generation_goldens.json")))
PROMPTS = GOLDENS["prompts"]


@pytest.fixture(scope="module")
def model(embedded_path):
    return kiln.load(embedded_path, backend="numpy", n_ctx=512)


def greedy_ids(model, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy tokens that run through EOS, as the golden run did (answers end before 32 tokens otherwise)."""
    out = []
    for token, _ in kiln.generate_step(model, prompt_ids):
        out.append(token)
        if len(out) == n:
            return out


@pytest.mark.parametrize("golden", PROMPTS, ids=[p["prompt"][:24] for p in PROMPTS])
def test_chat_prompt_tokenizes_like_hf_and_llama_cpp(model, golden):
    text = kiln.apply_chat_template(model, [{"role": "user", "content": golden["prompt"]}])
    assert text == golden["prompt_text"]
    assert model.tokenizer.encode(text) == golden["prompt_ids"]


@pytest.mark.parametrize("golden", PROMPTS, ids=[p["prompt"][:24] for p in PROMPTS])
def test_greedy_tokens_equal_hf_for_48_tokens(model, golden):
    want = golden["hf_ids_past_eos"]
    assert len(want) >= 32
    got = greedy_ids(model, golden["prompt_ids"], len(want))
    first_diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    assert first_diff is None, (
        f"step {first_diff}: kiln {got[first_diff]} vs HF {want[first_diff]} "
        f"(HF top-2 margin {golden['hf_top2_margins_past_eos'][first_diff]})"
    )


@pytest.mark.parametrize("golden", PROMPTS, ids=[p["prompt"][:24] for p in PROMPTS])
def test_answer_text_is_the_reference_english(model, golden):
    text = kiln.generate(model, model.tokenizer, golden["prompt_ids"], max_tokens=64)
    assert text == golden["hf_text"]
    assert len(text.split()) >= 5
