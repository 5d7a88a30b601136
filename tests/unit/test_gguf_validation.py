"""Malformed GGUF files end in one KilnError naming the defect -- never another exception, a hang or a blow-up --
and a fuzz run over mutated files finds no other outcome (tools/fuzz_gguf.py runs the bigger one)."""

from __future__ import annotations

import importlib.util
import os
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType, GGUFWriter

from kiln import gguf, quant, synth
from kiln.api import load as api_load
from kiln.errors import GGUFError, KilnError, UnsupportedModel
from kiln.generate import generate_step
from kiln.tokenizer import Tokenizer, UnsupportedTokenizer

TINY = synth.SHAPES["tiny"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> bytes:
    path = synth.write_model(str(tmp_path_factory.mktemp("v") / "b.gguf"), TINY, Q.Q8_0, seed=1)
    return open(path, "rb").read()


def _write(tmp_path, data: bytes) -> str:
    path = str(tmp_path / "m.gguf")
    with open(path, "wb") as f:
        f.write(data)
    return path


def _with_meta(tmp_path, **overrides) -> str:
    meta = {k.replace("__", "."): v for k, v in overrides.items()}
    return synth.write_model(str(tmp_path / "m.gguf"), TINY, Q.Q8_0, meta_overrides=meta)


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("llama.attention.head_count", 0, "head_count = 0 is out of range"),
        ("llama.block_count", 10**9, "block_count = 1000000000 is out of range"),
        ("llama.embedding_length", 0, "embedding_length = 0"),
        ("llama.feed_forward_length", 2**31 + 5, "feed_forward_length"),
    ],
)
def test_integer_fields_out_of_range(tmp_path, key, value, words):
    with pytest.raises(GGUFError, match=words):
        gguf.load(_with_meta(tmp_path, **{key.replace(".", "__"): value}))


def _meta_file(tmp_path, key: str, value, vtype: GGUFValueType) -> str:
    """The tiny model with one metadata key rewritten with a chosen type."""
    path = str(tmp_path / "t.gguf")
    w = GGUFWriter(path, "llama")
    synth.add_metadata(w, TINY, Q.Q8_0, "llama")
    w.kv_data[0][key] = type(w.kv_data[0][next(iter(w.kv_data[0]))])(value=value, type=vtype)
    for t in synth.tensor_plan(TINY, Q.Q8_0, Q.Q8_0, True):
        rng = np.random.default_rng(0)
        if t[0] == "m":
            raw = quant.random_weight(t[4], t[2], t[3], rng, 0.02)
            w.add_tensor(t[1], raw, raw_shape=raw.shape, raw_dtype=t[4])
        else:
            w.add_tensor(t[1], np.ones(t[2], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    "key, value, vtype, words",
    [
        ("llama.attention.layer_norm_rms_epsilon", float("nan"), GGUFValueType.FLOAT32, "epsilon = nan"),
        ("llama.attention.layer_norm_rms_epsilon", -1.0, GGUFValueType.FLOAT32, "epsilon = -1.0"),
        ("llama.rope.freq_base", float("inf"), GGUFValueType.FLOAT32, "freq_base"),
        ("llama.rope.freq_base", 0.0, GGUFValueType.FLOAT32, "freq_base"),
        ("llama.block_count", "two", GGUFValueType.STRING, "block_count = 'two' is not an integer"),
        ("llama.attention.head_count", 4.0, GGUFValueType.FLOAT32, "head_count = 4.0 is not an integer"),
    ],
)
def test_wrong_typed_or_nonfinite_metadata(tmp_path, key, value, vtype, words):
    with pytest.raises(KilnError, match=words):
        gguf.load(_meta_file(tmp_path, key, value, vtype))


def test_add_bos_stored_as_a_string(tmp_path):
    path = _meta_file(tmp_path, "tokenizer.ggml.add_bos_token", "true", GGUFValueType.STRING)
    with pytest.raises(UnsupportedTokenizer, match="add_bos_token = 'true' is not a bool"):
        Tokenizer.from_gguf_fields(gguf.load(path).tokenizer_fields())


def test_bos_id_outside_the_vocabulary(tmp_path):
    path = _meta_file(tmp_path, "tokenizer.ggml.bos_token_id", 100_000, GGUFValueType.UINT32)
    with pytest.raises(UnsupportedTokenizer, match="bos_token_id = 100000 is outside the vocabulary of 512"):
        Tokenizer.from_gguf_fields(gguf.load(path).tokenizer_fields())


def test_merge_naming_an_unknown_token(tmp_path):
    fields = gguf.load(synth.write_model(str(tmp_path / "m.gguf"), TINY, Q.Q8_0)).tokenizer_fields()
    fields["tokenizer.ggml.merges"] = ["zz qq"]
    with pytest.raises(UnsupportedTokenizer, match="merges"):
        Tokenizer.from_gguf_fields(fields)


def test_tokenizer_smaller_than_the_model(tmp_path, monkeypatch):
    """The model could emit an id that no token decodes: refused at load (llama.cpp refuses any mismatch)."""
    small = synth._byte_tokenizer_fields(512)
    monkeypatch.setattr(synth, "_tokenizer_fields", lambda vocab_size: small)
    wide = synth.Shape(2, 256, 4, 2, 512, vocab_size=600, context_length=256)
    path = synth.write_model(str(tmp_path / "m.gguf"), wide, Q.Q8_0)
    with pytest.raises(GGUFError, match="the tokenizer has 512 tokens but the model's vocabulary is 600"):
        api_load(path, backend="numpy", n_ctx=16)


def _patch_u64(data: bytes, old: int, new: int, nth: int = 0) -> bytes:
    needle = struct.pack("<Q", old)
    at = -1
    for _ in range(nth + 1):
        at = data.index(needle, at + 1)
    return data[:at] + struct.pack("<Q", new) + data[at + 8 :]


def test_array_count_of_two_to_the_forty_is_bounded(tmp_path, base):
    n_tokens = TINY.vocab_size  # the tokens array's count, as a u64 after its item type
    data = _patch_u64(base, n_tokens, 2**40)
    with pytest.raises(GGUFError, match="claims 1099511627776 array elements"):
        gguf.load(_write(tmp_path, data))


def test_tensor_offset_near_two_to_the_sixty_four(tmp_path, base):
    f = gguf.load(_write(tmp_path, base))
    off = int(f.reader.tensors[1].data_offset - f.reader.data_offset)
    data = _patch_u64(base, off, 2**64 - 32)
    with pytest.raises(GGUFError, match="runs past the end|overlap"):
        gguf.load(_write(tmp_path, data))


def test_aliased_tensor_data(tmp_path, base):
    f = gguf.load(_write(tmp_path, base))
    offs = [int(t.data_offset - f.reader.data_offset) for t in f.reader.tensors]
    data = _patch_u64(base, offs[2], offs[1])  # tensor 2 reads tensor 1's bytes
    with pytest.raises(GGUFError, match="overlap"):
        gguf.load(_write(tmp_path, data))


def test_unknown_type_id_is_named(tmp_path, base):
    f = gguf.load(_write(tmp_path, base))
    name = f.reader.tensors[0].name.encode()
    at = base.index(name) + len(name) + 4 + 8 * len(f.reader.tensors[0].shape)  # n_dims, dims, then the type
    data = base[:at] + struct.pack("<I", 31) + base[at + 4 :]
    with pytest.raises(UnsupportedModel, match=r"type id 31 \(Q4_0_4_4\), which kiln does not support"):
        gguf.load(_write(tmp_path, data))


def test_nan_block_scale_and_nan_norm(tmp_path, base):
    f = gguf.load(_write(tmp_path, base))
    first = f.reader.tensors[0]  # token_embd, Q8_0: its first block's f16 scale
    at = int(first.data_offset)
    with pytest.raises(GGUFError, match="token_embd.weight .Q8_0. has a NaN or infinite block scale at index 0"):
        gguf.load(_write(tmp_path, base[:at] + b"\x00\x7e" + base[at + 2 :]))
    norm = next(t for t in f.reader.tensors if t.name == "output_norm.weight")
    at = int(norm.data_offset) + 4 * 7
    with pytest.raises(GGUFError, match="output_norm.weight .F32. has a NaN or infinite value at index 7"):
        gguf.load(_write(tmp_path, base[:at] + struct.pack("<f", float("inf")) + base[at + 4 :]))


def test_huge_but_finite_weights_are_refused_when_they_overflow(tmp_path, base):
    f = gguf.load(_write(tmp_path, base))
    norm = next(t for t in f.reader.tensors if t.name == "blk.0.attn_norm.weight")
    at = int(norm.data_offset)
    data = base[:at] + struct.pack("<f", 3e38) * 4 + base[at + 16 :]
    model = api_load(_write(tmp_path, data), backend="numpy", n_ctx=16)
    with pytest.raises(KilnError, match="NaN or infinite logits"), np.errstate(all="ignore"):
        next(generate_step(model, [1, 2, 3]))


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("fuzz_gguf", os.path.join(ROOT, "tools", "fuzz_gguf.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzzed_files_end_in_one_clear_line_or_run():
    """300 mutated files (header fields, counts, types, offsets, cuts, NaN data): each is a one-line KilnError or
    loads and decodes finite logits, within 2 s and 1 GB."""
    with np.errstate(all="ignore"):
        counts = _fuzz_module().run(300, seed=17)
    assert set(counts) <= {"error", "ran"}, counts
    assert counts["error"] > 50 and counts["ran"] > 50, counts  # both outcomes are exercised
