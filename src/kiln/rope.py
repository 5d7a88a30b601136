"""Rotary position embedding parameters, read from GGUF metadata as llama.cpp reads them, and the per-pair
frequency table every backend rotates with.

Every scaling llama.cpp applies to a dense llama/qwen2 model reduces to an effective inverse frequency per rotated
pair (angle = position * inv_freq[i]) and one multiplier of cos and sin (`mscale`). With base = theta^(-2i/d):

- freq factors (`rope_freqs.weight`, Llama 3.1/3.2/3.3's "llama3" scaling, baked in by the converter): base / ff[i];
- linear (`{arch}.rope.scaling.type` "linear", or no type: llama.cpp's default): base / factor;
- yarn: each pair mixes the interpolated base / factor and the extrapolated base by ggml's ramp over the
  correction dims (ggml_rope_yarn_corr_dims), and cos/sin are scaled by 1 + 0.1 ln(factor);
- `{arch}.rope.scaling.attn_factor` multiplies cos/sin on top of any of them.

Freq factors compose with linear or yarn as in ggml (they divide the base before the mix). The table is computed
in float64 on the host: the reference uses it directly and the GPU backends upload it (or cos/sin made from it).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import GGUFError, UnsupportedModel

if TYPE_CHECKING:
    from .gguf import TensorInfo

SCALINGS = ("none", "linear", "yarn")
YARN_BETA_FAST = 32.0  # llama_hparams' defaults; llama.cpp's llama/qwen2 loaders never read the yarn_* keys
YARN_BETA_SLOW = 1.0
FREQS_TENSOR = "rope_freqs.weight"
_NEOX_ARCHS = ("qwen2",)  # llama_model_rope_type: qwen2 rotates halves; llama files are permuted for pairs


@dataclass(frozen=True)
class Rope:
    """How to rotate: hashable, so backends key their device tables by it."""

    theta: float = 10000.0
    neox: bool = False  # pairs (i, i + d/2), else (2i, 2i + 1)
    scaling: str = "none"  # one of SCALINGS
    factor: float = 1.0  # context extension factor (llama.cpp's freq_scale = 1 / factor)
    orig_ctx: int = 0  # yarn: the context length the model was trained with
    beta_fast: float = YARN_BETA_FAST
    beta_slow: float = YARN_BETA_SLOW
    attn_factor: float = 1.0
    freq_factors: tuple[float, ...] | None = None  # rope_freqs.weight, one per pair

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"rope scaling '{self.scaling}' is not one of {SCALINGS}")
        if self.scaling == "yarn" and self.orig_ctx <= 0:
            raise ValueError("yarn rope scaling needs orig_ctx > 0")

    @property
    def kind(self) -> str:
        """What the table does, for messages: none, linear, yarn, llama3 (freq factors), or llama3+linear/yarn."""
        if self.freq_factors is None:
            return self.scaling
        return "llama3" if self.scaling == "none" else f"llama3+{self.scaling}"

    def describe(self) -> str:
        """One line for `kiln info` and messages."""
        parts = [f"theta {self.theta:g}", "neox" if self.neox else "normal"]
        if self.kind != "none":
            parts.append(f"{self.kind} scaling")
        if self.scaling != "none":
            since = f" from {self.orig_ctx} tokens" if self.scaling == "yarn" else ""
            parts.append(f"factor {self.factor:g}{since}")
        if self.attn_factor != 1.0:
            parts.append(f"attn_factor {self.attn_factor:g}")
        return ", ".join(parts)

    @property
    def mscale(self) -> float:
        """The cos/sin multiplier. For yarn llama.cpp pre-divides its attn factor by 1 + 0.1 ln(factor) and ggml's
        rope_yarn multiplies it back, so the net factor is get_mscale(factor) = 1 + 0.1 ln(factor) (1 if
        factor <= 1), times rope.scaling.attn_factor."""
        yarn = 1.0 + 0.1 * math.log(self.factor) if self.scaling == "yarn" and self.factor > 1.0 else 1.0
        return yarn * self.attn_factor

    def corr_dims(self, head_dim: int) -> tuple[float, float]:
        """ggml_rope_yarn_corr_dims: the pairs below `low` keep the extrapolated (original) frequency, those above
        `high` are fully interpolated; a linear ramp between."""
        return yarn_corr_dims(head_dim, self.orig_ctx, self.theta, self.beta_fast, self.beta_slow)

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """The effective inverse frequency of each pair, float64 [head_dim / 2] (read-only, cached)."""
        return _inv_freq(self, head_dim)

    def cos_sin(self, positions: np.ndarray, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 cos and sin [T, head_dim / 2] of each position's angles, made in float64 (times mscale) and
        rounded once: the reference rotates with them, and the GPU tables made from them match it bit for bit."""
        angles = np.asarray(positions, np.float64)[:, None] * self.inv_freq(head_dim)[None, :]
        cos, sin = np.cos(angles), np.sin(angles)
        if self.mscale != 1.0:
            cos, sin = cos * self.mscale, sin * self.mscale
        return cos.astype(np.float32), sin.astype(np.float32)

    @classmethod
    def from_metadata(cls, meta: dict, tensors: dict[str, TensorInfo], arch: str, head_dim: int) -> Rope:
        return _from_metadata(cls, meta, tensors, arch, head_dim)


def yarn_corr_dim(n_dims: int, n_ctx_orig: int, n_rot: float, base: float) -> float:
    """ggml_rope_yarn_corr_dim: the pair index whose wavelength fits n_rot times in the original context."""
    return n_dims * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))


def yarn_corr_dims(
    n_dims: int, n_ctx_orig: int, base: float, beta_fast: float, beta_slow: float
) -> tuple[float, float]:
    low = math.floor(yarn_corr_dim(n_dims, n_ctx_orig, beta_fast, base))
    high = math.ceil(yarn_corr_dim(n_dims, n_ctx_orig, beta_slow, base))
    return float(max(0, low)), float(min(n_dims - 1, high))


@functools.cache
def _inv_freq(rope: Rope, head_dim: int) -> np.ndarray:
    half = head_dim // 2
    base = rope.theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if rope.freq_factors is not None:
        if len(rope.freq_factors) != half:
            raise ValueError(f"rope has {len(rope.freq_factors)} freq factors for head_dim {head_dim}")
        base = base / np.asarray(rope.freq_factors, np.float64)
    if rope.scaling == "linear":
        base = base / rope.factor
    elif rope.scaling == "yarn":
        low, high = rope.corr_dims(head_dim)
        ramp = 1.0 - np.clip((np.arange(half, dtype=np.float64) - low) / max(0.001, high - low), 0.0, 1.0)
        base = base * ((1.0 - ramp) / rope.factor + ramp)  # ext_factor 1: llama.cpp's default for yarn
    base.setflags(write=False)
    return base


def llama3_freq_factors(
    theta: float, head_dim: int, factor: float = 8.0, low: float = 1.0, high: float = 4.0, orig_ctx: int = 8192
) -> tuple[float, ...]:
    """The rope_freqs.weight values llama.cpp's converter writes for Llama 3.1's "llama3" rope_scaling (rounded
    to f32 as in the file): long wavelengths slowed by `factor`, short ones kept, a smooth blend between."""
    out = []
    for freq in theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < orig_ctx / high:
            out.append(1.0)
        elif wavelen > orig_ctx / low:
            out.append(factor)
        else:
            smooth = (orig_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return tuple(float(np.float32(v)) for v in out)


# --- reading GGUF metadata ---------------------------------------------------------------------------------------


def _number(meta: dict, key: str, default: float) -> float:
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GGUFError(f"GGUF metadata {key} = {value!r} is not a number")
    value = float(value)
    if not math.isfinite(value):
        raise GGUFError(f"GGUF metadata {key} = {value} is not finite")
    return value


def _scaling(meta: dict, arch: str) -> str:
    key = f"{arch}.rope.scaling.type"
    name = meta.get(key, "linear")  # llama.cpp's default: linear, with factor 1 unless a factor key says otherwise
    if name == "longrope":
        raise UnsupportedModel(
            f"{key} = 'longrope' (Phi-3 long/short factors) is not supported; kiln runs none, "
            "linear, yarn and llama3 (rope_freqs.weight) scaling"
        )
    if name not in SCALINGS:
        raise UnsupportedModel(f"unknown {key} = {name!r}; expected one of: {', '.join(SCALINGS)}")
    return name


def _factor(meta: dict, arch: str) -> float:
    """rope.scaling.factor, else the old rope.scale_linear; 0 means unset in llama.cpp (no scaling)."""
    key = f"{arch}.rope.scaling.factor"
    if key not in meta:
        key = f"{arch}.rope.scale_linear"
    factor = _number(meta, key, 0.0)
    if factor < 0:
        raise GGUFError(f"GGUF metadata {key} = {factor:g}: a rope scaling factor must be positive")
    return factor or 1.0


def _check_yarn_keys(meta: dict, arch: str, factor: float) -> None:
    """The converter may write yarn_* keys that llama.cpp's llama/qwen2 loaders never read (they use the defaults).
    A default value agrees with both; any other value would make kiln wrong for one of the two: refuse it."""
    defaults = {
        "yarn_ext_factor": 1.0,
        "yarn_beta_fast": YARN_BETA_FAST,
        "yarn_beta_slow": YARN_BETA_SLOW,
        "yarn_attn_factor": 1.0 + 0.1 * math.log(factor) if factor > 1 else 1.0,
        "yarn_log_multiplier": 0.0,
    }
    for name, default in defaults.items():
        key = f"{arch}.rope.scaling.{name}"
        if key in meta and not math.isclose(_number(meta, key, default), default, rel_tol=1e-6, abs_tol=1e-7):
            raise UnsupportedModel(
                f"GGUF metadata {key} = {meta[key]!r} is not supported for {arch} (llama.cpp ignores it; kiln "
                f"runs the default {default:g})"
            )


def _freq_factors(tensors: dict[str, TensorInfo], head_dim: int) -> tuple[float, ...] | None:
    info = tensors.get(FREQS_TENSOR)
    if info is None:
        return None
    if info.qtype.name != "F32" or info.shape != (head_dim // 2,):
        raise GGUFError(
            f"tensor '{FREQS_TENSOR}' is {info.qtype.name} {info.shape}; expected F32 ({head_dim // 2},) "
            f"(one factor per rotated pair of head_dim {head_dim})"
        )
    values = np.asarray(info.raw).view(np.float32)
    bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
    if bad.size:
        raise GGUFError(f"tensor '{FREQS_TENSOR}' holds {values[bad[0]]} at {bad[0]}; factors must be finite and > 0")
    return tuple(float(v) for v in values)


def _from_metadata(cls, meta: dict, tensors: dict[str, TensorInfo], arch: str, head_dim: int) -> Rope:
    p = f"{arch}.rope."
    n_rot = meta.get(p + "dimension_count", head_dim)
    if n_rot != head_dim:
        raise UnsupportedModel(
            f"{p}dimension_count = {n_rot} (partial rotary) is not supported; kiln rotates all "
            f"{head_dim} dims of a head"
        )
    theta = _number(meta, p + "freq_base", 10000.0)
    if theta <= 1.0:
        raise GGUFError(f"GGUF metadata {p}freq_base = {theta:g}; expected a rope base > 1")
    scaling, factor = _scaling(meta, arch), _factor(meta, arch)
    if scaling == "none" or (scaling == "linear" and factor == 1.0):
        scaling, factor = "none", 1.0  # llama.cpp: type none never scales, whatever the factor says
    attn_factor = _number(meta, p + "scaling.attn_factor", 1.0)
    if attn_factor <= 0:
        raise GGUFError(f"GGUF metadata {p}scaling.attn_factor = {attn_factor:g}; expected > 0")
    orig_ctx = 0
    if scaling == "yarn":
        _check_yarn_keys(meta, arch, factor)
        orig_ctx = int(_number(meta, p + "scaling.original_context_length", meta.get(f"{arch}.context_length", 0)))
        if orig_ctx <= 0:
            raise GGUFError(f"yarn rope scaling needs {p}scaling.original_context_length (or {arch}.context_length)")
    return cls(
        theta=theta,
        neox=arch in _NEOX_ARCHS,
        scaling=scaling,
        factor=factor,
        orig_ctx=orig_ctx,
        attn_factor=attn_factor,
        freq_factors=_freq_factors(tensors, head_dim) if arch == "llama" else None,
    )
