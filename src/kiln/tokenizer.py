"""Tokenizers built from GGUF metadata, matching llama.cpp's tokenization of the same file.

The heavy lifting (BPE merging, special-token splitting, regex pre-tokenization) runs in HF `tokenizers`;
this module only translates GGUF keys into a `tokenizers.Tokenizer` the way llama.cpp interprets them:

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE. ``tokenizer.ggml.pre`` picks the pre-tokenizer regexes
  (llama.cpp keys them by that name, not by the HF tokenizer.json the file came from).
* ``tokenizer.ggml.model == "llama"``: SentencePiece BPE (Llama 2, TinyLlama). GGUF has no merges for these,
  only scores; SentencePiece merges the adjacent pair whose union is the highest-scoring vocab entry, which is
  BPE with every (left, right) split of every token as a merge, ranked by the merged token's score.

Decoding is done here, not by `tokenizers`, so that bytes of byte-level and <0xNN> tokens can be joined before
UTF-8 decoding and streamed without ever splitting a character.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from .errors import UnsupportedModel

__all__ = ["StreamDecoder", "Tokenizer", "UnsupportedTokenizer", "read_tokenizer_fields"]

# llama_token_type values stored in tokenizer.ggml.token_type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPM_SPACE = "\u2581"  # "▁", SentencePiece's visible space

# Texts llama.cpp treats as end-of-generation when the vocab has them (it scans the vocab by text because
# converters rarely store eot_token_id). Kept to the Llama-family ones kiln runs.
EOG_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "<EOT>",
)


class UnsupportedTokenizer(UnsupportedModel, ValueError):
    """The GGUF's tokenizer model or pre-tokenizer is one kiln cannot reproduce faithfully."""


# --- pre-tokenizer regexes, per llama.cpp pre type (src/llama-vocab.cpp, llm_tokenizer_bpe) -----------------
# Each entry is applied in order, splitting every piece into matches and non-matches (HF "isolated" Split is
# the same operation as llama.cpp's unicode_regex_split). Written in the form HF's Oniguruma engine accepts.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreType:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a pre-token that is itself a vocab entry is emitted whole (Llama 3)
    add_bos: bool = False  # default when the GGUF has no tokenizer.ggml.add_bos_token


_PRE_TYPES = {
    # llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT (also used when the key is missing); not the same as gpt-2
    "default": _PreType((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
    "gpt2": _PreType((_GPT2,)),
    # digits split one by one before the GPT-2 regex
    "smollm": _PreType((r"\p{N}", _GPT2)),
    "llama3": _PreType((_LLAMA3,), ignore_merges=True, add_bos=True),
    "qwen2": _PreType((_QWEN2,)),
}

_PRE_ALIASES = {
    "": "default",
    "default": "default",
    "gpt2": "gpt2",
    "gpt-2": "gpt2",
    "phi-2": "gpt2",
    "mpt": "gpt2",
    "olmo": "gpt2",
    "smollm": "smollm",
    "starcoder": "smollm",
    "refact": "smollm",
    "codeshell": "smollm",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "llama-bpe": "llama3",
    "falcon3": "llama3",
    "qwen2": "qwen2",
    "deepseek-r1-qwen": "qwen2",
    "stablelm2": "qwen2",
    "megrez": "qwen2",
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def _as_list(value) -> list:
    """Metadata arrays may arrive as lists, tuples or numpy arrays; strings may be bytes."""
    if value is None:
        return []
    out = list(value)
    return [v.decode("utf-8", errors="replace") if isinstance(v, bytes | bytearray) else v for v in out]


_LIST_FIELDS = {
    "tokenizer.ggml.tokens": str,
    "tokenizer.ggml.merges": str,
    "tokenizer.ggml.token_type": int,
    "tokenizer.ggml.scores": float,
}
_SCALAR_FIELDS = {"tokenizer.ggml.model": str, "tokenizer.ggml.pre": str, "tokenizer.chat_template": str}


def check_fields(fields: Mapping) -> None:
    """Every tokenizer field of the type llama.cpp reads it as, every special-token id inside the vocabulary: a file
    that stores add_bos_token as a string or a BOS id past the vocabulary is refused here, by name."""
    n = None
    for key, kind in _LIST_FIELDS.items():
        if key not in fields:
            continue
        value = fields[key]
        if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
            raise UnsupportedTokenizer(f"GGUF metadata {key} must be an array of {kind.__name__}")
        items = _as_list(value)
        ok = (lambda v: isinstance(v, str)) if kind is str else _is_number if kind is float else _is_int
        bad = next((i for i, v in enumerate(items) if not ok(v)), None)
        if bad is not None:
            raise UnsupportedTokenizer(f"GGUF metadata {key}[{bad}] = {items[bad]!r:.40} is not a {kind.__name__}")
        if key == "tokenizer.ggml.tokens":
            n = len(items)
    for key, kind in _SCALAR_FIELDS.items():
        if key in fields and not isinstance(fields[key], kind):
            raise UnsupportedTokenizer(f"GGUF metadata {key} = {fields[key]!r:.40} is not a string")
    for key, value in fields.items():
        if key.startswith("tokenizer.ggml.add_") and not isinstance(value, bool | np.bool_):
            raise UnsupportedTokenizer(f"GGUF metadata {key} = {value!r:.40} is not a bool")
        if key.endswith("_token_id"):
            if not _is_int(value):
                raise UnsupportedTokenizer(f"GGUF metadata {key} = {value!r:.40} is not an integer")
            if n is not None and not (0 <= int(value) < n or int(value) == -1):  # -1: llama.cpp's "none"
                raise UnsupportedTokenizer(f"GGUF metadata {key} = {value} is outside the vocabulary of {n} tokens")


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


def _is_number(v) -> bool:
    return _is_int(v) or isinstance(v, float | np.floating)


def _opt_int(fields: Mapping, key: str) -> int | None:
    v = fields.get(key)
    return None if v is None or int(v) == -1 else int(v)


def read_tokenizer_fields(path) -> dict:
    """The tokenizer.* metadata of a GGUF file as plain Python values (what `from_gguf_fields` takes)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


class Tokenizer:
    """Encode/decode with a GGUF's vocabulary. Build with `from_gguf_fields` (or `from_gguf` for a path)."""

    def __init__(self, fields: Mapping):
        model = fields.get("tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise UnsupportedTokenizer(
                f"tokenizer model {model!r} is not supported; kiln handles 'gpt2' (byte-level BPE) and "
                "'llama' (SentencePiece BPE)"
            )
        check_fields(fields)
        self.model = model
        self.tokens: list[str] = [str(t) for t in _as_list(fields.get("tokenizer.ggml.tokens"))]
        if not self.tokens:
            raise UnsupportedTokenizer("GGUF has no tokenizer.ggml.tokens")
        n = len(self.tokens)
        types = [int(t) for t in _as_list(fields.get("tokenizer.ggml.token_type"))] or [NORMAL] * n
        if len(types) != n:
            raise UnsupportedTokenizer(f"token_type has {len(types)} entries for {n} tokens")
        self.token_types = types
        self._ids = self._vocab()
        self.chat_template: str | None = fields.get("tokenizer.chat_template")
        self.add_space_prefix = False
        self.unk_id = _opt_int(fields, "tokenizer.ggml.unknown_token_id")

        if model == "llama":
            self.pre = None
            self.add_space_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
            default_bos, self.bos_id, self.eos_id = True, 1, 2
            if self.unk_id is None:
                self.unk_id = 0
            hf_model = self._spm_model(fields)
            normalizer = normalizers.Replace(" ", SPM_SPACE)
            if self.add_space_prefix:
                # HF applies the normalizer to each piece between special tokens, which is exactly where
                # llama.cpp adds its prefix space (the start of the text and after every special token).
                normalizer = normalizers.Sequence([normalizers.Prepend(SPM_SPACE), normalizer])
            pre_tokenizer = None
        else:
            pre_name = str(fields.get("tokenizer.ggml.pre") or "")
            if pre_name not in _PRE_ALIASES:
                known = ", ".join(sorted(set(_PRE_ALIASES) - {""}))
                raise UnsupportedTokenizer(f"pre-tokenizer {pre_name!r} is not supported; known: {known}")
            self.pre = _PRE_ALIASES[pre_name]
            pre = _PRE_TYPES[self.pre]
            default_bos, self.bos_id, self.eos_id = pre.add_bos, None, None
            merges = []
            for m in _as_list(fields.get("tokenizer.ggml.merges")):
                i = m.find(" ", 1)  # llama.cpp's split: the first space after the first character
                if i > 0:
                    merges.append((m[:i], m[i + 1 :]))
            try:
                hf_model = BPE(self._ids, merges, ignore_merges=pre.ignore_merges)
            except Exception as e:  # tokenizers raises on a merge naming a token not in the vocabulary
                raise UnsupportedTokenizer(f"tokenizer.ggml.merges names tokens outside the vocabulary: {e}") from None
            normalizer = None
            pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
            )

        if "tokenizer.ggml.bos_token_id" in fields:
            self.bos_id = _opt_int(fields, "tokenizer.ggml.bos_token_id")
        if "tokenizer.ggml.eos_token_id" in fields:
            self.eos_id = _opt_int(fields, "tokenizer.ggml.eos_token_id")
        self.add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", default_bos)) and self.bos_id is not None
        self.eos_ids = frozenset(self._eog_ids(fields))

        self._pieces = [self._piece_bytes(i) for i in range(n)]
        try:
            self._hf = self._build_hf(hf_model, normalizer, pre_tokenizer)
        except Exception as e:  # HF tokenizers' own exceptions (a merge naming an unknown token, ...)
            raise UnsupportedTokenizer(f"the GGUF's tokenizer vocabulary and merges are inconsistent: {e}") from None
        self._hf_plain: HFTokenizer | None = None  # built on first parse_special=False call
        self._hf_parts = (hf_model, normalizer, pre_tokenizer)

    @classmethod
    def from_gguf_fields(cls, fields: Mapping) -> Tokenizer:
        """fields: GGUF metadata key -> Python value (only the tokenizer.* keys are read)."""
        return cls(fields)

    @classmethod
    def from_gguf(cls, path) -> Tokenizer:
        return cls(read_tokenizer_fields(path))

    # --- construction helpers ----------------------------------------------------------------------------
    def _vocab(self) -> dict[str, int]:
        vocab: dict[str, int] = {}
        for i, t in enumerate(self.tokens):
            vocab.setdefault(t, i)  # duplicates (rare, broken converters) keep their first id
        return vocab

    def _spm_model(self, fields: Mapping) -> BPE:
        scores = [float(s) for s in _as_list(fields.get("tokenizer.ggml.scores"))]
        if len(scores) != len(self.tokens):
            raise UnsupportedTokenizer("SentencePiece GGUF needs tokenizer.ggml.scores, one per token")
        vocab = self._ids
        ranked = []
        for tok, tid in vocab.items():
            for i in range(1, len(tok)):
                left, right = tok[:i], tok[i:]
                if left in vocab and right in vocab:
                    ranked.append((-scores[tid], tid, i, left, right))
        ranked.sort()  # highest score first; ties by id then split point, for a deterministic order
        merges = [(left, right) for *_, left, right in ranked]
        unk = self.tokens[self.unk_id] if self.unk_id is not None and 0 <= self.unk_id < len(self.tokens) else None
        return BPE(vocab, merges, unk_token=unk, byte_fallback=True, fuse_unk=False)

    def _build_hf(self, model: BPE, normalizer, pre_tokenizer, parse_special: bool = True) -> HFTokenizer:
        hf = HFTokenizer(model)
        if normalizer is not None:
            hf.normalizer = normalizer
        if pre_tokenizer is not None:
            hf.pre_tokenizer = pre_tokenizer
        added = []
        for i, (t, ty) in enumerate(zip(self.tokens, self.token_types, strict=True)):
            if not t or self._vocab_id(t) != i:
                continue
            if ty in (CONTROL, UNKNOWN):
                added.append(AddedToken(t, special=True, normalized=False))
            elif ty == USER_DEFINED:
                # user-defined pieces are split out even with parse_special off, as llama.cpp and HF do
                added.append(AddedToken(t, special=False, normalized=False))
        hf.add_tokens(added)
        hf.encode_special_tokens = not parse_special
        return hf

    def _vocab_id(self, text: str) -> int | None:
        return self._ids.get(text)

    def _eog_ids(self, fields: Mapping) -> set[int]:
        ids = {
            i
            for i in (
                self.eos_id,
                _opt_int(fields, "tokenizer.ggml.eot_token_id"),
                _opt_int(fields, "tokenizer.ggml.eom_token_id"),
            )
            if i is not None
        }
        for text in EOG_TEXTS:
            i = self._vocab_id(text)
            if i is not None and self.token_types[i] in (CONTROL, USER_DEFINED):
                ids.add(i)
        return ids

    def _piece_bytes(self, i: int) -> bytes:
        """What token i contributes to decoded text (special tokens as their text; skipping is decided later)."""
        text, ty = self.tokens[i], self.token_types[i]
        if ty in (CONTROL, UNKNOWN, USER_DEFINED):
            return text.encode("utf-8")
        if ty == UNUSED:
            return b""
        if ty == BYTE or (self.model == "llama" and len(text) == 6 and text.startswith("<0x") and text[-1] == ">"):
            try:
                return bytes([int(text[3:5], 16)])
            except ValueError:
                pass
        if self.model == "llama":
            return text.replace(SPM_SPACE, " ").encode("utf-8")
        if all(c in _BYTE_DECODER for c in text):
            return bytes(_BYTE_DECODER[c] for c in text)
        return text.encode("utf-8")  # not a byte-level string (a broken vocab entry): keep it readable

    # --- public API ----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def is_special(self, token_id: int) -> bool:
        """Control/unknown tokens: the ones `skip_special` drops and parse_special=False never produces."""
        return 0 <= token_id < len(self.tokens) and self.token_types[token_id] in (CONTROL, UNKNOWN)

    def token_text(self, token_id: int | None) -> str:
        """The vocab entry as stored (e.g. '<|im_start|>', 'Ġthe', '▁the'); '' for None."""
        return "" if token_id is None else self.tokens[token_id]

    def token_to_id(self, text: str) -> int | None:
        return self._vocab_id(text)

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of text. add_bos=None uses the model's default (True for SentencePiece/Llama 3, False for
        SmolLM). With parse_special, control tokens written in the text (``<|im_start|>``) become their ids."""
        if parse_special:
            hf = self._hf
        else:
            if self._hf_plain is None:
                self._hf_plain = self._build_hf(*self._hf_parts, parse_special=False)
            hf = self._hf_plain
        ids = hf.encode(text, add_special_tokens=False).ids if text else []
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def piece(self, token_id: int, skip_special: bool = False) -> bytes:
        """Raw bytes of one token; may be part of a UTF-8 character (byte-level and <0xNN> tokens)."""
        if skip_special and self.is_special(token_id):
            return b""
        return self._pieces[token_id]

    def _strips_space(self) -> bool:
        return self.model == "llama" and self.add_space_prefix

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ids. Special tokens render as their text unless skip_special. For SentencePiece, the space
        that encoding prefixed is removed from the first piece, so decode(encode(s, add_bos=False)) == s."""
        out = bytearray()
        strip = self._strips_space()
        for i in ids:
            p = self.piece(int(i), skip_special)
            if strip and p:
                p = p[1:] if p.startswith(b" ") else p
                strip = False
            out += p
        return out.decode("utf-8", errors="replace")

    def stream(self, ids: Iterable[int], skip_special: bool = False) -> Iterator[str]:
        """Yield text chunks as ids arrive; "".join(stream(ids)) == decode(ids) with the same skip_special."""
        dec = StreamDecoder(self, skip_special=skip_special)
        for i in ids:
            s = dec.add(i)
            if s:
                yield s
        s = dec.flush()
        if s:
            yield s

    def __repr__(self) -> str:
        kind = "SentencePiece BPE" if self.model == "llama" else f"byte-level BPE ({self.pre})"
        return f"Tokenizer({kind}, vocab={self.vocab_size}, bos={self.bos_id}, eos={sorted(self.eos_ids)})"


class StreamDecoder:
    """Incremental detokenizer: `add(id)` returns only complete UTF-8 text; bytes of a character split across
    tokens (emoji, CJK in byte-level BPE, <0xNN> fallback) are held until the character is whole.

    skip_special defaults to True because this serves generated text, where control tokens are markup; the
    concatenation of every `add` and the final `flush` equals `tokenizer.decode(ids, skip_special)`. For
    SentencePiece the first piece loses its prefix space as in `decode`; pass strip_leading_space=False when
    continuing text whose prefix was already shown.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True, strip_leading_space: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._strip = strip_leading_space and tokenizer._strips_space()
        self._started = False
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        p = self.tokenizer.piece(int(token_id), self.skip_special)
        if not p:
            return ""
        if self._strip and not self._started and p.startswith(b" "):
            p = p[1:]
        self._started = True
        return self._utf8.decode(p)

    put = add

    def flush(self) -> str:
        """Emit what is left; an unfinished character at the end becomes U+FFFD, as decode() would."""
        return self._utf8.decode(b"", final=True)
