"""The tensors each architecture reads, with the shapes its metadata implies and whether a file must hold them.

Validation (gguf.py), the model loader, sharding (shard.py) and tests read this one table. A tensor outside it is
refused, never ignored: a file whose block_count is smaller than its layers, or that carries weights the forward
would not use (an extra bias, an unknown projection), runs wrong if loaded, so it is not loaded.
Optional tensors follow llama.cpp's loader (`TENSOR_NOT_REQUIRED`): llama's projection and FFN biases and its
rope_freqs (Llama 3.1 scaling factors); qwen2's Q/K/V biases are required there and here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import GGUFError, UnsupportedModel

if TYPE_CHECKING:
    from .gguf import ModelConfig, TensorInfo


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]  # (rows, cols) for matrices, (n,) for vectors
    required: bool


_MOE_TENSOR = re.compile(r"^blk\.\d+\.ffn_(gate_inp|(gate|up|down)_(exps|shexp))\.")
_LAYER = re.compile(r"^blk\.(\d+)\.")

# Layer tensors beyond the dense core, by architecture: suffix -> required.
_BIASES = {
    "llama": {
        "attn_q.bias": False,
        "attn_k.bias": False,
        "attn_v.bias": False,
        "attn_output.bias": False,
        "ffn_gate.bias": False,
        "ffn_up.bias": False,
        "ffn_down.bias": False,
    },
    "qwen2": {"attn_q.bias": True, "attn_k.bias": True, "attn_v.bias": True},
}


def layer_specs(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """One block's tensors, by name suffix after 'blk.N.'."""
    d, q, kv, ff = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
    specs = {
        "attn_norm.weight": TensorSpec((d,), True),
        "attn_q.weight": TensorSpec((q, d), True),
        "attn_k.weight": TensorSpec((kv, d), True),
        "attn_v.weight": TensorSpec((kv, d), True),
        "attn_output.weight": TensorSpec((d, q), True),
        "ffn_norm.weight": TensorSpec((d,), True),
        "ffn_gate.weight": TensorSpec((ff, d), True),
        "ffn_up.weight": TensorSpec((ff, d), True),
        "ffn_down.weight": TensorSpec((d, ff), True),
    }
    bias_rows = {"attn_q": q, "attn_k": kv, "attn_v": kv, "attn_output": d, "ffn_gate": ff, "ffn_up": ff, "ffn_down": d}
    for suffix, required in _BIASES[cfg.arch].items():
        specs[suffix] = TensorSpec((bias_rows[suffix.split(".")[0]],), required)
    return specs


def tensor_table(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor the architecture reads, by full name."""
    d = cfg.d_model
    table = {
        "token_embd.weight": TensorSpec((cfg.vocab_size, d), True),
        "output_norm.weight": TensorSpec((d,), True),
        "output.weight": TensorSpec((cfg.vocab_size, d), False),  # absent: tied to token_embd
    }
    if cfg.arch == "llama":
        table["rope_freqs.weight"] = TensorSpec((cfg.head_dim // 2,), False)  # Llama 3.1 rope scaling factors
    layer = layer_specs(cfg)
    for i in range(cfg.n_layers):
        table |= {f"blk.{i}.{suffix}": spec for suffix, spec in layer.items()}
    return table


def expected_shapes(cfg: ModelConfig, present: set[str] | None = None) -> dict[str, tuple[int, ...]]:
    """The shapes of the required tensors, plus the optional ones in `present` (the file's names)."""
    present = present or set()
    return {n: s.shape for n, s in tensor_table(cfg).items() if s.required or n in present}


def refuse_moe(cfg: ModelConfig, meta: dict, names: set[str]) -> None:
    """Mixture-of-experts files share the llama/qwen2 architecture names but have no dense FFN: say so, rather than
    report a missing ffn_gate tensor."""
    experts = meta.get(f"{cfg.arch}.expert_count")
    moe = sorted(n for n in names if _MOE_TENSOR.match(n))
    if moe or (isinstance(experts, int) and experts > 0):
        what = f"{cfg.arch}.expert_count = {experts}" if experts else f"tensor '{moe[0]}'"
        raise UnsupportedModel(
            f"mixture-of-experts models are not supported ({what}); kiln runs dense {cfg.arch} models only"
        )


def check_tensors(cfg: ModelConfig, meta: dict, tensors: dict[str, TensorInfo]) -> None:
    """Every required tensor present with the shape the metadata implies; no tensor the forward would not read."""
    names = set(tensors)
    refuse_moe(cfg, meta, names)
    table = tensor_table(cfg)
    for name, spec in table.items():
        if name not in tensors:
            if spec.required:
                raise GGUFError(f"GGUF lacks tensor '{name}' needed by the {cfg.arch} architecture")
            continue
        if tensors[name].shape != spec.shape:
            raise GGUFError(f"tensor '{name}' has shape {tensors[name].shape}, but the metadata implies {spec.shape}")
    unused = sorted(names - table.keys(), key=_layer_order)
    if unused:
        raise GGUFError(_unused_message(cfg, unused))


def _layer_order(name: str) -> tuple[int, str]:
    m = _LAYER.match(name)
    return (int(m.group(1)) if m else -1, name)


def _unused_message(cfg: ModelConfig, unused: list[str]) -> str:
    first = unused[0]
    m = _LAYER.match(first)
    more = f" and {len(unused) - 1} more" if len(unused) > 1 else ""
    if m and int(m.group(1)) >= cfg.n_layers:
        return (
            f"GGUF holds tensor '{first}'{more} beyond {cfg.arch}.block_count = {cfg.n_layers}: "
            "the block count does not match the layers in the file"
        )
    return (
        f"GGUF holds tensor '{first}'{more} that the {cfg.arch} architecture does not read; "
        "kiln refuses files whose tensors it would ignore"
    )
