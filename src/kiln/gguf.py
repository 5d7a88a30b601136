"""Read and validate a GGUF file (memory-mapped, through the `gguf` package) and map it to a ModelConfig.

Every way a file can be wrong ends here as one GGUFError/UnsupportedModel naming the problem, before any
weight reaches a device.
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from . import gguf_scan, quant, tensor_table
from .errors import GGUFError, UnsupportedModel
from .rope import Rope

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
    rope: Rope  # theta, layout (qwen2 rotates halves, NeoX; llama GGUFs are permuted for pairs) and scaling
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
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            gguf_scan.scan(path, view)
        finally:
            view.release()
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
    """A tensor the header walk (gguf_scan) already found of a supported type, in bounds: its view and checks."""
    qtype = GGMLQuantizationType(int(t.tensor_type))
    dims = [int(n) for n in t.shape]  # ggml order: ne0 (cols) first
    shape = tuple(reversed(dims)) if len(dims) > 1 else (dims[0],)
    expected = quant.row_bytes(qtype, shape[-1]) * (shape[0] if len(shape) > 1 else 1)
    raw = np.asarray(t.data).view(np.uint8)
    if raw.nbytes != expected:
        raise GGUFError(f"tensor {t.name} holds {raw.nbytes} bytes, expected {expected}: file truncated or corrupt")
    bad = quant.first_nonfinite(raw, qtype)
    if bad is not None:
        what = "value" if qtype in quant.FLOATS else "block scale"
        raise GGUFError(f"tensor {t.name} ({qtype.name}) has a NaN or infinite {what} at index {bad}: corrupt weights")
    if len(shape) > 1:
        raw = raw.reshape(shape[0], -1)
    return TensorInfo(t.name, qtype, shape, raw)


_NO_DEFAULT = object()


def _int(meta: dict, key: str, default=_NO_DEFAULT, lo: int = 1, hi: int = 1 << 31) -> int:
    """An integer field in [lo, hi]: wrong types (a string, a float, an array, a bool) and out-of-range values are
    named, never converted."""
    if key not in meta:
        if default is _NO_DEFAULT:
            raise GGUFError(f"GGUF metadata lacks required key '{key}'")
        return default
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise GGUFError(f"GGUF metadata {key} = {_show(value)} is not an integer")
    if not lo <= int(value) <= hi:
        raise GGUFError(f"GGUF metadata {key} = {value} is out of range: expected {lo} to {hi}")
    return int(value)


def _float(meta: dict, key: str, default: float, lo: float) -> float:
    """A finite number >= lo (integers accepted)."""
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise GGUFError(f"GGUF metadata {key} = {_show(value)} is not a number")
    if not math.isfinite(value) or value < lo:
        raise GGUFError(f"GGUF metadata {key} = {value} is out of range: expected a finite number >= {lo:g}")
    return float(value)


def _name(meta: dict) -> str:
    name = meta.get("general.name", "unnamed")
    return name if isinstance(name, str) else _show(name)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _config(meta: dict, tensors: dict[str, TensorInfo]) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch is None:
        raise GGUFError("GGUF metadata lacks 'general.architecture'")
    if not isinstance(arch, str):
        raise GGUFError(f"GGUF metadata general.architecture = {_show(arch)} is not a string")
    if arch not in ARCHITECTURES:
        raise UnsupportedModel(f"unsupported architecture '{arch}' (kiln runs: {', '.join(ARCHITECTURES)})")
    if "token_embd.weight" not in tensors:
        raise GGUFError("GGUF has no token_embd.weight tensor")
    # A layer has at least 9 tensors: a block count past the tensors present would build a huge table for nothing.
    n_layers = _int(meta, f"{arch}.block_count", hi=max(1, len(tensors) // 9))
    d_model = _int(meta, f"{arch}.embedding_length", hi=1 << 20)
    n_heads = _int(meta, f"{arch}.attention.head_count", hi=d_model)
    n_kv_heads = _int(meta, f"{arch}.attention.head_count_kv", n_heads, hi=n_heads)
    vocab = _int(meta, f"{arch}.vocab_size", tensors["token_embd.weight"].shape[0], hi=1 << 24)
    head_dim = _int(meta, f"{arch}.attention.key_length", d_model // n_heads, hi=1 << 16)
    if head_dim < 2 or head_dim % 2:
        raise GGUFError(f"head dimension {head_dim} must be even (rope rotates pairs)")
    if n_heads % n_kv_heads:
        raise GGUFError(f"head_count {n_heads} is not a multiple of head_count_kv {n_kv_heads}")
    rope = Rope.from_metadata(meta, tensors, arch, head_dim)
    return ModelConfig(
        arch=arch,
        name=_name(meta),
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        d_ff=_int(meta, f"{arch}.feed_forward_length", hi=1 << 24),
        vocab_size=vocab,
        context_length=_int(meta, f"{arch}.context_length", 2048, hi=1 << 24),
        rope=rope,
        norm_eps=_float(meta, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5, lo=0.0),
        tied_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
    )


def expected_shapes(cfg: ModelConfig, present: set[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward pass reads (the required ones, and the optional ones named in `present`), with the
    shape the metadata implies: tensor_table.py holds the table."""
    return tensor_table.expected_shapes(cfg, present)


def load(path: str) -> GGUFFile:
    return GGUFFile(path)
