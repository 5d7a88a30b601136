"""A tiny SentencePiece-style (tokenizer.ggml.model = "llama") vocabulary, built in code.

Real Llama 2 / TinyLlama vocabs cannot ship with the tests, so tools/make_goldens.py writes this vocab to a
GGUF, tokenizes TINY_SPM_TEXTS with llama.cpp, and stores the ids; tests/unit/test_tokenizer.py rebuilds the
same vocab from this module and compares. Both sides must import this file so the vocab cannot drift.

Layout follows Llama 2: <unk>, <s>, </s>, the 256 <0xNN> byte tokens, then pieces scored by merge priority.
"""

from __future__ import annotations

import string

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6

# Multi-character pieces in merge priority order (earlier = higher score), each reachable by merging two
# pieces listed before it or single characters.
PIECES = [
    "▁▁", "▁t", "er", "in", "▁a", "en", "on", "▁th", "es", "▁▁▁▁", "▁s", "▁d", "at", "or", "an", "▁c", "is",
    "re", "it", "▁the", "ar", "le", "▁w", "▁p", "ou", "al", "▁f", "▁m", "ed", "▁o", "▁b", "om", "io", "ion",
    "ing", "ic", "as", "ll", "▁h", "▁he", "llo", "▁hello", "el", "ent", "▁in", "nd", "et", "▁l", "▁n", "st", "▁to",
    "ch", "▁I", "ro", "▁wor", "ld", "▁world", "▁1", "12", "▁12", "▁▁▁", "▁é", "té", "日本", "▁日本",
    "▁'", "'s", "▁(", "):", "▁=", "▁x",
]  # fmt: skip
# Single characters come last, as in SentencePiece vocabs. Characters missing here (most of Unicode, emoji,
# tabs, newlines) fall back to <0xNN> byte tokens.
CHARS = ["▁"] + list(string.ascii_lowercase) + list(string.ascii_uppercase) + list(string.digits) + [
    ".", ",", "!", "?", "'", "(", ")", ":", "=", "-", "日", "本", "é",
]  # fmt: skip
SPECIALS = [("<|im_start|>", CONTROL), ("<|im_end|>", CONTROL), ("<mask>", USER_DEFINED)]

TINY_SPM_TEXTS = [
    "",
    " ",
    "  ",
    "hello world",
    " hello world",
    "hello  world",
    "Hello World!",
    "the cat is on the mat",
    "   leading spaces",
    "trailing spaces   ",
    "line one\nline two\n\n",
    "a\tb",
    "12 123 1234567",
    "it's the world's end",
    "café été",
    "日本 日本語",
    "emoji 😀 and 👨‍👩‍👧",
    "x = (1):",
    "<s>hello</s>",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "hello<mask>world",
    "<unk> text",
]


def tiny_spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """tokens, scores, token types."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    scores = [0.0] * len(tokens)
    for text, ty in SPECIALS:
        tokens.append(text)
        types.append(ty)
        scores.append(0.0)
    for rank, piece in enumerate(PIECES + CHARS):
        tokens.append(piece)
        types.append(NORMAL)
        scores.append(-float(rank + 1))
    assert len(set(tokens)) == len(tokens), "duplicate piece"
    return tokens, scores, types


def tiny_spm_fields() -> dict:
    """GGUF tokenizer metadata as `kiln.tokenizer.Tokenizer.from_gguf_fields` takes it."""
    tokens, scores, types = tiny_spm_vocab()
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": True,
    }


def write_tiny_spm_gguf(path) -> str:
    """Write the vocab as a tensor-less GGUF that llama.cpp loads with vocab_only=True."""
    from gguf import GGUFWriter

    tokens, scores, types = tiny_spm_vocab()
    w = GGUFWriter(str(path), "llama")
    # hyperparameters llama.cpp requires even for a vocab-only load
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(16)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
