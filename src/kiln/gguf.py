"""Read and validate a GGUF file (memory-mapped, through the `gguf` package) and map it to a ModelConfig.

Every way a file can be wrong ends here as one GGUFError/UnsupportedModel naming the problem, before any
weight reaches a device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from . import quant, tensor_table
from .errors import GGUFError, UnsupportedModel

ARCHITECTURES = ("llama", "qwen2")
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rope_neox: bool  # qwen2 rotates halves (NeoX); llama GGUFs are permuted for adjacent pairs
    norm_eps: float
    tied_embeddings: bool
    qkv_bias: bool


@dataclass
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # (rows, cols) for matrices, (n,) for vectors
    raw: np.ndarray  # uint8 view into the memory map: (rows, row_bytes) or (n * elem_size,)

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes


class GGUFFile:
    """A validated GGUF model: metadata, config and memory-mapped tensors."""

    def __init__(self, path: str):
        self.path = str(path)
        self.reader = _open_reader(self.path)
        self.metadata = _read_metadata(self.reader)
        self.tensors = {t.name: _tensor_info(t) for t in self.reader.tensors}
        self.config = _config(self.metadata, self.tensors)
        tensor_table.check_tensors(self.config, self.metadata, self.tensors)

    @property
    def file_size(self) -> int:
        return os.path.getsize(self.path)

    def tokenizer_fields(self) -> dict:
        return {k: v for k, v in self.metadata.items() if k.startswith("tokenizer.")}

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    def close(self) -> None:
        """Drop our references to the memory map; it closes once no weight view uses it."""
        self.tensors.clear()
        self.reader = None


class _Reader(GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map: slicing a np.memmap costs a Python-level
    __array_finalize__ per slice, which made parsing a 49k-token vocabulary 3x slower. Still memory-mapped."""

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value


def _open_reader(path: str) -> GGUFReader:
    if not os.path.exists(path):
        raise GGUFError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise GGUFError(f"model path is a directory, expected a .gguf file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"not a GGUF file (magic {magic!r}, expected b'GGUF'): {path}")
    try:
        reader = _Reader(path, "r")
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, TypeError) as e:
        raise GGUFError(f"corrupt or truncated GGUF file {path}: {e}") from None
    return reader


def _read_metadata(reader: GGUFReader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise GGUFError(f"unreadable metadata field {key}: {e}") from None
    return meta


def _tensor_info(t) -> TensorInfo:
    qtype = GGMLQuantizationType(int(t.tensor_type))
    dims = [int(n) for n in t.shape]  # ggml order: ne0 (cols) first
    shape = tuple(reversed(dims)) if len(dims) > 1 else (dims[0],)
    try:
        quant.check_supported(qtype)
    except quant.UnsupportedQuantType as e:
        raise UnsupportedModel(f"tensor {t.name}: {e}") from None
    expected = quant.row_bytes(qtype, shape[-1]) * (shape[0] if len(shape) > 1 else 1)
    raw = np.asarray(t.data).view(np.uint8)
    if raw.nbytes != expected:
        raise GGUFError(f"tensor {t.name} holds {raw.nbytes} bytes, expected {expected}: file truncated or corrupt")
    if len(shape) > 1:
        raw = raw.reshape(shape[0], -1)
    return TensorInfo(t.name, qtype, shape, raw)


def _get(meta: dict, key: str, default=None, required=True):
    if key in meta:
        return meta[key]
    if required and default is None:
        raise GGUFError(f"GGUF metadata lacks required key '{key}'")
    return default


def _config(meta: dict, tensors: dict[str, TensorInfo]) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch is None:
        raise GGUFError("GGUF metadata lacks 'general.architecture'")
    if arch not in ARCHITECTURES:
        raise UnsupportedModel(f"unsupported architecture '{arch}' (kiln runs: {', '.join(ARCHITECTURES)})")
    d_model = int(_get(meta, f"{arch}.embedding_length"))
    n_heads = int(_get(meta, f"{arch}.attention.head_count"))
    n_kv_heads = int(_get(meta, f"{arch}.attention.head_count_kv", n_heads))
    if "token_embd.weight" not in tensors:
        raise GGUFError("GGUF has no token_embd.weight tensor")
    vocab = int(meta.get(f"{arch}.vocab_size") or tensors["token_embd.weight"].shape[0])
    head_dim = int(meta.get(f"{arch}.attention.key_length") or d_model // n_heads)
    if n_heads % n_kv_heads:
        raise GGUFError(f"head_count {n_heads} is not a multiple of head_count_kv {n_kv_heads}")
    return ModelConfig(
        arch=arch,
        name=str(meta.get("general.name", "unnamed")),
        n_layers=int(_get(meta, f"{arch}.block_count")),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        d_ff=int(_get(meta, f"{arch}.feed_forward_length")),
        vocab_size=vocab,
        context_length=int(_get(meta, f"{arch}.context_length", 2048, required=False)),
        rope_theta=float(_get(meta, f"{arch}.rope.freq_base", 10000.0, required=False)),
        rope_neox=arch == "qwen2",
        norm_eps=float(_get(meta, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5, required=False)),
        tied_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
    )


def expected_shapes(cfg: ModelConfig, present: set[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward pass reads (the required ones, and the optional ones named in `present`), with the
    shape the metadata implies: tensor_table.py holds the table."""
    return tensor_table.expected_shapes(cfg, present)


def load(path: str) -> GGUFFile:
    return GGUFFile(path)
