"""A bounded walk over a GGUF header before the `gguf` package parses it.

The gguf reader trusts every count it reads: an array count of 2^40 makes it slice empty arrays forever, a nesting
of arrays a thousand deep recurses, a tensor offset near 2^64 wraps. This walk reads the same bytes with every count
bounded by what is left of the file, so a bad header ends in one GGUFError naming the field or tensor, in time and
memory proportional to the file. It also checks what the reader does not: tensor types kiln knows, non-zero
dimensions, data aligned, in bounds and not overlapping (llama.cpp's gguf.cpp checks the same).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import quant
from .errors import GGUFError, UnsupportedModel

VERSIONS = (2, 3)
MAX_DEPTH = 2  # an array of arrays at most (nothing in a model file nests deeper)
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_KEY = 1 << 16
# ggml type ids the gguf package knows no name for, or knows but kiln cannot run: named in the error.
_REPACKED = {31: "Q4_0_4_4", 32: "Q4_0_4_8", 33: "Q4_0_8_8", 36: "IQ4_NL_4_4", 37: "IQ4_NL_4_8", 38: "IQ4_NL_8_8"}
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass(frozen=True)
class TensorSlot:
    name: str
    qtype: int
    dims: tuple[int, ...]  # ggml order: ne0 first
    offset: int  # from the start of the data section
    nbytes: int


class _Cursor:
    def __init__(self, data: memoryview, path: str):
        self.data, self.pos, self.path = data, 0, path

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.left():
            raise GGUFError(f"GGUF file {self.path} is truncated: {what} needs {n} bytes, {self.left()} are left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.unpack("Q", what + " length")
        if limit is not None and n > limit:
            raise GGUFError(f"{what} is {n} bytes long, more than the {limit} allowed")
        raw = bytes(self.take(n, what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{what} is not valid UTF-8") from None


def _skip_value(c: _Cursor, vtype: int, key: str, depth: int = 0) -> None:
    if vtype in _SCALAR:
        c.take(struct.calcsize(_SCALAR[vtype]), f"value of {key}")
    elif vtype == 8:
        n = c.unpack("Q", f"string length of {key}")
        c.take(n, f"string of {key}")
    elif vtype == 9:
        if depth >= MAX_DEPTH:
            raise GGUFError(f"metadata {key} nests arrays more than {MAX_DEPTH} deep")
        item = c.unpack("I", f"array type of {key}")
        count = c.unpack("Q", f"array count of {key}")
        _bound_array(c, key, item, count)
        if item in _SCALAR:
            c.take(count * struct.calcsize(_SCALAR[item]), f"array {key}")
        elif item == 8:
            _skip_strings(c, key, count)
        else:
            for _ in range(count):
                _skip_value(c, item, key, depth + 1)
    else:
        raise GGUFError(f"metadata {key} has unknown value type {vtype}")


def _skip_strings(c: _Cursor, key: str, count: int) -> None:
    """A vocabulary is ~10^5 strings: one tight loop rather than a call per string."""
    data, pos, end, unpack = c.data, c.pos, len(c.data), struct.Struct("<Q").unpack_from
    for i in range(count):
        if pos + 8 > end:
            raise GGUFError(f"GGUF file {c.path} is truncated inside array {key} (string {i} of {count})")
        pos += 8 + unpack(data, pos)[0]
    if pos > end:
        raise GGUFError(f"GGUF file {c.path} is truncated inside array {key} (its last string)")
    c.pos = pos


def _bound_array(c: _Cursor, key: str, item: int, count: int) -> None:
    """Every element takes at least one byte (a string at least 8): a count past the bytes left is a lie."""
    least = struct.calcsize(_SCALAR[item]) if item in _SCALAR else 8 if item in (8, 9) else 1
    if count * least > c.left():
        raise GGUFError(f"metadata {key} claims {count} array elements, more than the {c.left()} bytes left hold")


def _qtype_name(qtype: int) -> str:
    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return _REPACKED.get(qtype, "unknown")


def _tensor_bytes(name: str, qtype: int, dims: tuple[int, ...]) -> int:
    try:
        qt = GGMLQuantizationType(qtype)
        quant.check_supported(qt)
    except (ValueError, quant.UnsupportedQuantType):
        raise UnsupportedModel(
            f"tensor {name} uses ggml type id {qtype} ({_qtype_name(qtype)}), which kiln does not support; "
            f"supported: {', '.join(t.name for t in quant.SUPPORTED)}"
        ) from None
    block, block_bytes = GGML_QUANT_SIZES[qt]
    if dims[0] % block:
        raise GGUFError(f"tensor {name}: {dims[0]} columns are not a whole number of {qt.name} blocks of {block}")
    return int(np.prod(dims, dtype=object)) // block * block_bytes


def scan(path: str, data: memoryview) -> list[TensorSlot]:
    """Walk the header of the GGUF in `data`; raise on the first defect. Returns the tensors' data slots."""
    c = _Cursor(data, path)
    c.take(4, "magic")
    version = c.unpack("I", "version")
    if version not in VERSIONS:
        raise GGUFError(f"GGUF version {version} is not supported (kiln reads versions 2 and 3): {path}")
    n_tensors = c.unpack("Q", "tensor count")
    n_kv = c.unpack("Q", "metadata count")
    if n_kv * 12 > c.left() or n_tensors * 28 > c.left():  # the smallest key/value and tensor entries
        raise GGUFError(
            f"GGUF header claims {n_kv} metadata fields and {n_tensors} tensors, more than the file holds "
            "(truncated or corrupt)"
        )
    alignment = 32
    for i in range(n_kv):
        key = c.string(f"metadata key {i}", MAX_KEY)
        vtype = c.unpack("I", f"type of {key}")
        start = c.pos
        _skip_value(c, vtype, key)
        if key == "general.alignment":
            alignment = _alignment(vtype, bytes(data[start : c.pos]))
    slots = [_tensor_slot(c, i) for i in range(n_tensors)]
    data_start = -(-c.pos // alignment) * alignment
    _check_slots(path, slots, alignment, len(data) - data_start)
    return slots


def _alignment(vtype: int, raw: bytes) -> int:
    value = struct.unpack("<I", raw)[0] if vtype == 4 else None
    if value is None or value <= 0 or value & (value - 1):
        raise GGUFError(f"general.alignment must be a u32 power of two, got type {vtype} value {raw.hex()}")
    return value


def _tensor_slot(c: _Cursor, i: int) -> TensorSlot:
    name = c.string(f"name of tensor {i}", MAX_KEY)
    n_dims = c.unpack("I", f"dimension count of tensor {name}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise GGUFError(f"tensor {name} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
    dims = tuple(c.unpack("Q", f"dimensions of tensor {name}") for _ in range(n_dims))
    if any(d <= 0 or d >= 1 << 40 for d in dims):
        raise GGUFError(f"tensor {name} has dimensions {dims}; each must be between 1 and 2^40")
    qtype = c.unpack("I", f"type of tensor {name}")
    offset = c.unpack("Q", f"offset of tensor {name}")
    return TensorSlot(name, qtype, dims, offset, _tensor_bytes(name, qtype, dims))


def _check_slots(path: str, slots: list[TensorSlot], alignment: int, data_size: int) -> None:
    names = set()
    for s in slots:
        if s.name in names:
            raise GGUFError(f"tensor {s.name} appears twice in the file")
        names.add(s.name)
        if s.offset % alignment:
            raise GGUFError(f"tensor {s.name}: data offset {s.offset} is not aligned to {alignment} bytes")
        if s.offset + s.nbytes > data_size:
            raise GGUFError(
                f"tensor {s.name}: data [{s.offset}, {s.offset + s.nbytes}) runs past the end of the file's data "
                f"section ({data_size} bytes): the file is truncated or the offset is corrupt ({path})"
            )
    ordered = sorted(slots, key=lambda s: s.offset)
    for a, b in zip(ordered, ordered[1:]):
        if b.offset < a.offset + a.nbytes:
            raise GGUFError(f"tensors {a.name} and {b.name} overlap in the file's data section")
