"""Random-weight GGUFs of real model shapes, written with the gguf writer: for tests, benchmarks and selftest.

Quantized blocks are random bytes with small fixed scales (quant.random_weight): no quantization pass, so even a
7B-shape file is written in about a minute. The tokenizer keys are copied from the embedded SmolLM2 GGUF unless the
caller gives its own, so the files load through the normal path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from tqdm import tqdm

from . import quant
from .errors import KilnError


@dataclass(frozen=True)
class Shape:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab_size: int = 49152
    context_length: int = 2048
    rope_theta: float = 10000.0


SHAPES = {
    "tiny": Shape(2, 256, 4, 2, 512, vocab_size=512, context_length=256),  # 256: the K-quant super-block size
    "smollm2-135m": Shape(30, 576, 9, 3, 1536, 49152, 8192, 100000.0),
    "tinyllama-1.1b": Shape(22, 2048, 32, 4, 5632, 32000, 2048),
    "llama-7b": Shape(32, 4096, 32, 32, 11008, 32000, 4096),
    "llama-70b": Shape(80, 8192, 64, 8, 28672, 32000, 4096),  # Llama 2 70B: GQA 8:1, d_ff 3.5 x d
}


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _file_type(qtype: GGMLQuantizationType) -> LlamaFileType:
    """general.file_type is llama.cpp's file-type enum, not the tensor type id (Q8_0 is 7 there, 8 here)."""
    names = {"F32": "ALL_F32", "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M"}
    return LlamaFileType[names.get(qtype.name, f"MOSTLY_{qtype.name}")]


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in character for each byte value (the byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _byte_tokenizer_fields(vocab_size: int) -> list[tuple[str, object, GGUFValueType | None]]:
    """A merge-free byte-level BPE vocabulary (3 specials + 256 bytes + padding) for tiny test models: any text
    encodes, and the GGUF stays small and fast to parse."""
    tokens = list(SPECIALS) + _byte_chars() + ["ab"]  # one merge: the gguf writer cannot store an empty array
    tokens += [f"<pad_{i}>" for i in range(vocab_size - len(tokens))]
    types = [3] * len(SPECIALS) + [1] * (vocab_size - len(SPECIALS))
    return [
        ("tokenizer.ggml.model", "gpt2", GGUFValueType.STRING),
        ("tokenizer.ggml.pre", "gpt2", GGUFValueType.STRING),
        ("tokenizer.ggml.tokens", tokens, None),
        ("tokenizer.ggml.token_type", types, None),
        ("tokenizer.ggml.merges", ["a b"], None),
        ("tokenizer.ggml.bos_token_id", 0, GGUFValueType.UINT32),
        ("tokenizer.ggml.eos_token_id", 2, GGUFValueType.UINT32),
        ("tokenizer.ggml.add_bos_token", False, GGUFValueType.BOOL),
        ("tokenizer.chat_template", CHATML, GGUFValueType.STRING),
    ]


def _embedded_path() -> str | None:
    """Where SmolLM2's tokenizer keys are read from: $KILN_TOKENIZER_GGUF (any GGUF holding them, e.g. the
    tokenizer-only file bench/peers/prepare_llama_cpp.sh writes for GPU machines), else the embedded model."""
    from .api import default_model_path

    if os.environ.get("KILN_TOKENIZER_GGUF"):
        return os.environ["KILN_TOKENIZER_GGUF"]
    try:
        path = default_model_path()
    except KilnError:
        return None
    return path if os.path.exists(path) else None


def _consistent_merges(merges: list[str], vocab: set[str]) -> list[str]:
    """The merges whose parts and result survive a vocabulary cut: tokenizers rejects any other."""
    out = []
    for merge in merges:
        a, _, b = merge.partition(" ")
        if a in vocab and b in vocab and a + b in vocab:
            out.append(merge)
    return out


def _tokenizer_fields(vocab_size: int) -> list[tuple[str, object, GGUFValueType | None]]:
    """SmolLM2's tokenizer keys, the vocab cut or padded to vocab_size (padding tokens are never produced);
    below 1024 tokens, or where neither the embedded model nor $KILN_TOKENIZER_GGUF is there, a byte-level
    vocabulary instead (kiln reads it; llama.cpp does not load it)."""
    embedded = _embedded_path() if vocab_size >= 1024 else None
    if embedded is None:
        return _byte_tokenizer_fields(vocab_size)
    fields = {
        key: (field.contents(), field.types[0] if field.types else None)
        for key, field in GGUFReader(embedded).fields.items()
        if key.startswith("tokenizer.")
    }
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        if key in fields:
            value, vtype = fields[key]
            pad = [f"<pad_{i}>" if key.endswith("tokens") else 1 for i in range(max(0, vocab_size - len(value)))]
            fields[key] = (list(value[:vocab_size]) + pad, vtype)
    merges, vtype = fields["tokenizer.ggml.merges"]
    fields["tokenizer.ggml.merges"] = (_consistent_merges(merges, set(fields["tokenizer.ggml.tokens"][0])), vtype)
    return [(key, value, vtype) for key, (value, vtype) in fields.items()]


def tensor_plan(
    shape: Shape,
    qtype: GGMLQuantizationType,
    embed_type: GGMLQuantizationType,
    tied: bool,
    arch: str = "llama",
    biases: tuple[str, ...] = (),
) -> list[tuple]:
    """A model's tensors in file order: ("m", name, rows, cols, type) for matrices, ("v", name, n, centre) for
    vectors (F32 near `centre`). qwen2 gets QKV biases; `biases` names more projections that get one (llama's
    optional attn_q/attn_k/attn_v/attn_output/ffn_gate/ffn_up/ffn_down biases)."""
    hd = shape.d_model // shape.n_heads
    d, kv = shape.d_model, shape.n_kv_heads * hd
    out: list[tuple] = [("m", "token_embd.weight", shape.vocab_size, d, embed_type)]
    if not tied:
        out.append(("m", "output.weight", shape.vocab_size, d, qtype))
    out.append(("v", "output_norm.weight", d, 1.0))
    for i in range(shape.n_layers):
        p = f"blk.{i}."
        out += [
            ("v", p + "attn_norm.weight", d, 1.0),
            ("v", p + "ffn_norm.weight", d, 1.0),
            ("m", p + "attn_q.weight", shape.n_heads * hd, d, qtype),
            ("m", p + "attn_k.weight", kv, d, qtype),
            ("m", p + "attn_v.weight", kv, d, qtype),
            ("m", p + "attn_output.weight", d, shape.n_heads * hd, qtype),
            ("m", p + "ffn_gate.weight", shape.d_ff, d, qtype),
            ("m", p + "ffn_up.weight", shape.d_ff, d, qtype),
            ("m", p + "ffn_down.weight", d, shape.d_ff, qtype),
        ]
        rows = {"attn_q": shape.n_heads * hd, "attn_k": kv, "attn_v": kv, "attn_output": d}
        rows |= {"ffn_gate": shape.d_ff, "ffn_up": shape.d_ff, "ffn_down": d}
        for part in ("attn_q", "attn_k", "attn_v") if arch == "qwen2" else ():
            out.append(("v", p + part + ".bias", rows[part], 0.0))
        for part in biases:
            if part not in rows:
                raise KilnError(f"no bias '{part}' in a {arch} block; expected one of {', '.join(rows)}")
            out.append(("v", p + part + ".bias", rows[part], 0.0))
    return out


def _value_type(value: object) -> GGUFValueType:
    """The GGUF type llama.cpp's converter writes for a rope.scaling.* value."""
    if isinstance(value, str):
        return GGUFValueType.STRING
    return GGUFValueType.UINT32 if isinstance(value, int) else GGUFValueType.FLOAT32


def add_metadata(
    w: GGUFWriter,
    shape: Shape,
    qtype: GGMLQuantizationType,
    arch: str,
    meta_overrides: dict | None = None,
    rope_scaling: dict | None = None,
) -> None:
    """The model's GGUF keys (llama.cpp's names) and the tokenizer's, into writer `w`. rope_scaling: the
    {arch}.rope.scaling.* keys, e.g. {"type": "yarn", "factor": 4.0, "original_context_length": 64}."""
    hd = shape.d_model // shape.n_heads
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    meta = {
        "general.name": (f"random {arch} {shape.n_layers}x{shape.d_model} {qtype.name}", GGUFValueType.STRING),
        "general.file_type": (int(_file_type(qtype)), u32),
        f"{arch}.block_count": (shape.n_layers, u32),
        f"{arch}.context_length": (shape.context_length, u32),
        f"{arch}.embedding_length": (shape.d_model, u32),
        f"{arch}.feed_forward_length": (shape.d_ff, u32),
        f"{arch}.attention.head_count": (shape.n_heads, u32),
        f"{arch}.attention.head_count_kv": (shape.n_kv_heads, u32),
        f"{arch}.rope.freq_base": (shape.rope_theta, f32),
        f"{arch}.attention.layer_norm_rms_epsilon": (1e-5, f32),
        f"{arch}.vocab_size": (shape.vocab_size, u32),
        f"{arch}.rope.dimension_count": (hd, u32),
    }
    for name, value in (rope_scaling or {}).items():
        meta[f"{arch}.rope.scaling.{name}"] = (value, _value_type(value))
    for key, value in (meta_overrides or {}).items():  # tests write inconsistent files on purpose
        meta[key] = (value, meta[key][1] if key in meta else u32)
    for key, (value, vtype) in meta.items():
        w.add_key_value(key, value, vtype)
    for key, value, vtype in _tokenizer_fields(shape.vocab_size):
        if isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, vtype)


def write_model(
    path: str,
    shape: Shape,
    qtype: GGMLQuantizationType,
    arch: str = "llama",
    seed: int = 0,
    embed_type: GGMLQuantizationType | None = GGMLQuantizationType.Q8_0,
    tied: bool = True,
    progress: bool = False,
    scale: float = 0.02,
    meta_overrides: dict | None = None,
    biases: tuple[str, ...] = (),
    extra_tensors: tuple[tuple, ...] = (),
    rope_scaling: dict | None = None,
    rope_freqs: Sequence[float] | None = None,
) -> str:
    """Write a random-weight model. Matrices use `qtype`; norms are F32 near 1; qwen2 gets QKV biases, and the
    projections named in `biases` get one too. extra_tensors: more entries in tensor_plan's form (tests write files
    that carry tensors the architecture does not read). rope_scaling: add_metadata's; rope_freqs: the values of a
    rope_freqs.weight tensor (Llama 3.1's freq factors, one per rotated pair)."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, arch)
    add_metadata(w, shape, qtype, arch, meta_overrides, rope_scaling)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    plan = tensor_plan(shape, qtype, embed_type or qtype, tied, arch, biases) + list(extra_tensors)
    for t in tqdm(plan, desc=f"writing {os.path.basename(path)}", disable=not progress):
        if t[0] == "m":
            raw = quant.random_weight(t[4], t[2], t[3], rng, scale)
            w.add_tensor(t[1], raw, raw_shape=raw.shape, raw_dtype=t[4])
        else:
            w.add_tensor(t[1], (t[3] + 0.1 * rng.standard_normal(t[2])).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
