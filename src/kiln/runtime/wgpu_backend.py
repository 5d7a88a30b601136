"""WebGPU backend (wgpu-py: Vulkan, Metal, D3D12; lavapipe on a CPU). Kernels live in kernels/wgsl/*.wgsl.

Execution model: every op records one or more dispatches into a single open compute pass; `flush()` ends the pass
and submits the whole step at once. `queue.write_buffer` runs on the queue timeline as soon as it is called, so
`write()` flushes recorded work first, and `download()` flushes and reads back through one persistent staging
buffer. Pipelines are cached by (kernel, header); parameters live in small uniform buffers cached by content and
bind groups are cached by their resources, so a decode step creates nothing new after the first token. Decode steps
are recorded once through the fusion pass (runtime/fusion.py: 6 dispatches per layer instead of 17) and re-encoded
per token, each one encoded while the device still runs the one before (see replay, _preencode).

Weights stay in their GGUF block formats, reorganised at upload only where a block's quants are not whole 16-byte
vectors (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q6_K): those split into a quant array plus arrays of their scales (and
mins, high bits), see _REPACK. A matrix larger than one storage binding allows is split by rows into parts, each
its own buffers and dispatch. Each format's kernels/wgsl/w_<format>.wgsl is pasted in front of the kernels that
read weights and defines `unit_dot` (GEMV: a block's dot product with x, from vec4 loads) and `load8` (GEMM,
embed: eight dequantized weights), both dequantizing exactly as quant.py does.

kiln's kernels compile through wgpu-native's "trusted" shader-module entry point with some of naga's runtime
checks off (_runtime_checks): on GPUs the bounds checks stay and the loop-bounding counters go (H200: decode 1.4x,
prompts 8x), CPU adapters keep every check. Kernels compiled through compile() keep them all. timeline() times each
dispatch of a decode step with GPU timestamps (bench/wgpu_kernels.py --timeline).

Kernel sources are WGSL files plus a generated header (`enable f16`, `alias act = f32;`, `const HD: u32 = 64u;`):
one file serves every activation/KV type and shape it is specialised for.
"""

from __future__ import annotations

import math
import os
import re
import struct
import tempfile
import time
import weakref
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Any

import numpy as np

from .. import quant
from ..errors import BackendUnavailable, UnsupportedOp
from ..rope import Rope
from .base import DTYPES, BufferPool, Device, Tensor, Weight
from .fusion import Fuser, OpRecorder

try:
    import wgpu
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"wgpu-py is not installed ({e})") from None
try:  # wgpu-py's wgpu-native layer (internals: pyproject pins wgpu 0.32.x), for _shader_module and timeline()
    from wgpu.backends.wgpu_native import _api as _wgpu_native
except ImportError:  # pragma: no cover - another wgpu-py backend
    _wgpu_native = None

_KERNELS = resources.files("kiln") / "kernels" / "wgsl"

# GGUF type -> weight snippet (kernels/wgsl/w_<name>.wgsl).
_FORMATS = {
    "F32": "f32",
    "F16": "f16",
    "BF16": "bf16",
    "Q8_0": "q8_0",
    "Q4_0": "q4_0",
    "Q4_1": "q4_1",
    "Q5_0": "q5_0",
    "Q5_1": "q5_1",
    "Q4_K": "q4_k",
    "Q5_K": "q5_k",
    "Q6_K": "q6_k",
}
# Formats repacked at upload so each block's quants are whole 16-byte vectors: block bytes, then the byte range of
# each array in binding order (8: quants, 9: scales (and mins), 10: high bits). The others upload as they are.
_REPACK = {
    "Q8_0": (34, [(2, 34), (0, 2)]),
    "Q4_0": (18, [(2, 18), (0, 2)]),
    "Q4_1": (20, [(4, 20), (0, 4)]),
    "Q5_0": (22, [(6, 22), (0, 2), (2, 6)]),
    "Q5_1": (24, [(8, 24), (0, 4), (4, 8)]),
    "Q6_K": (210, [(0, 208), (208, 210)]),
}

_STORAGE = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST
_MAX_GROUPS = 65535  # per grid dimension (WebGPU default limit)
_LIMITS = (
    "max-storage-buffer-binding-size",
    "max-buffer-size",
    "max-compute-workgroup-storage-size",
    "max-storage-buffers-per-shader-stage",
    "max-compute-invocations-per-workgroup",
    "max-compute-workgroup-size-x",
)
# Decode attention SPLITS x CHUNK per kernel (set_attention), for (GPUs, CPU adapters). GPUs want many workgroups;
# a CPU adapter wants few workgroups and few barriers.
_ATTN_SHAPES = {"v1": ((16, 64), (1, 256)), "v2": ((32, 32), (4, 64)), "v3": ((32, 32), (4, 64))}
_ATTN2_WG = 128  # attn_decode2 / attn_decode3 threads per workgroup
_ATTN3_MAX_U = 16  # attn_decode3: most keys per row per tile (registers)
_ADAPTER_RANK = {"DiscreteGPU": 0, "IntegratedGPU": 1, "VirtualGPU": 2, "Unknown": 3, "CPU": 4}


# naga's runtime checks (KILN_WGPU_CHECKS): an index clamp on every storage access, a counter on every loop.
_CHECKS = {"all": ("BoundsChecks", "ForceLoopBounding"), "bounds": ("BoundsChecks",), "loops": ("ForceLoopBounding",)}


def _runtime_checks(adapter_type: str) -> int | None:
    """The naga checks kiln's own kernels compile with (None: wgpu's default, all of them). On GPUs they keep the
    bounds checks but not the loop counters, a guard against infinite loops that kiln's loops (bounded by their
    parameters, proven by the conformance suite) do not need and that keeps the driver from unrolling them: H200
    decode 1.4x, prompts 8x (bench/NOTES.md). CPU adapters keep every check: without the counters LLVM unrolls
    the loops and lavapipe compiles a GEMV for half a minute. KILN_WGPU_CHECKS overrides (all/bounds/loops/none)."""
    choice = os.environ.get("KILN_WGPU_CHECKS") or ("all" if adapter_type == "CPU" else "bounds")
    if choice not in (*_CHECKS, "none"):
        raise ValueError(f"KILN_WGPU_CHECKS={choice!r}: use one of all, bounds, loops, none")
    if choice == "all" or _wgpu_native is None:
        return None
    lib = _wgpu_native.lib
    return sum((getattr(lib, f"WGPUShaderRuntimeChecks_{c}") for c in _CHECKS.get(choice, ())), 0)


class _IndexedReads:
    """Submissions that return wgpu-native's submission index, and 4-byte reads that wait for one submission only.

    wgpu-py's map_sync waits on its poll thread, which polls with wait=True and no submission index: that returns
    only when *all* submitted work is done. Reading greedy token t, with step t + 1 already submitted, so waited for
    step t + 1 as well, and the GPU idled while the host took the token and submitted step t + 2. Waiting for the
    copy's own submission lets step t + 1 run on meanwhile (H200, one process: TinyLlama decode 623 -> 671 tok/s).
    None where wgpu-py is not on wgpu-native (read_tokens then maps the usual way)."""

    def __init__(self, device, queue):
        api = self._api = _wgpu_native
        self._device, self._queue = device._internal, queue._internal
        statuses = self._statuses = []

        @api.ffi.callback("void(WGPUMapAsyncStatus, WGPUStringView, void *, void *)")
        def on_mapped(status, _message, _userdata1, _userdata2):
            statuses.append(status)

        self._info = api.new_struct(
            "WGPUBufferMapCallbackInfo", mode=api.lib.WGPUCallbackMode_AllowProcessEvents, callback=on_mapped
        )

    def submit(self, command_buffers: list) -> int:
        handles = self._api.new_array("WGPUCommandBuffer[]", [b._internal for b in command_buffers])
        return self._api.libf.wgpuQueueSubmitForIndex(self._queue, len(command_buffers), handles)

    def read_words(self, staging, index: int, n: int) -> list[int]:
        """The first n u32s of MAP_READ buffer `staging`, once submission `index` (which fills it) has finished."""
        api, libf = self._api, self._api.libf
        self._statuses.clear()
        libf.wgpuBufferMapAsync(staging._internal, api.lib.WGPUMapMode_Read, 0, 4 * n, self._info)
        libf.wgpuDevicePoll(self._device, True, api.ffi.new("WGPUSubmissionIndex *", index))  # runs the callback
        deadline = time.monotonic() + 10.0
        while not self._statuses and time.monotonic() < deadline:  # another thread's poll may be running it
            libf.wgpuDevicePoll(self._device, False, api.ffi.NULL)
        if self._statuses != [api.lib.WGPUMapAsyncStatus_Success]:
            raise RuntimeError(f"wgpu: mapping the token buffer failed (status {self._statuses})")
        try:
            words = api.ffi.cast("uint32_t *", libf.wgpuBufferGetConstMappedRange(staging._internal, 0, 4 * n))
            return [int(words[i]) for i in range(n)]
        finally:
            libf.wgpuBufferUnmap(staging._internal)


def _shader_module(device, label: str, code: str, checks: int | None):
    """A WGSL module compiled with the given naga runtime checks (None: wgpu's default, every check)."""
    if checks is None:
        return device.create_shader_module(label=label, code=code)
    api = _wgpu_native
    source = api.new_struct_p("WGPUShaderSourceWGSL *", code=api.to_c_string_view(code))
    source[0].chain.next = api.ffi.NULL
    source[0].chain.sType = api.lib.WGPUSType_ShaderSourceWGSL
    descriptor = api.new_struct_p(
        "WGPUShaderModuleDescriptor *",
        nextInChain=api.ffi.cast("WGPUChainedStruct *", source),
        label=api.to_c_string_view(label),
    )
    handle = api.libf.wgpuDeviceCreateShaderModuleTrusted(device._internal, descriptor, checks)
    if handle == api.ffi.NULL:
        raise RuntimeError(f"shader module creation failed: {label}")
    return api.GPUShaderModule(label, handle, device)


def _ceil4(n: int) -> int:
    return max(4, (n + 3) & ~3)


def _ceil16(n: int) -> int:
    return max(16, (n + 15) & ~15)


def _subgroup_feature(features) -> str | None:
    return next((f for f in ("subgroup", "subgroups") if f in features), None)


def _adapter_line(i: int, adapter) -> str:
    info, lim = adapter.info, adapter.limits
    feats = [f for f in ("shader-f16", _subgroup_feature(adapter.features)) if f and f in adapter.features]
    return (
        f"[{i}] {info['device']} ({info['backend_type']}, {info['adapter_type']})\n"
        f"      max binding {lim['max-storage-buffer-binding-size'] >> 20} MiB, "
        f"max buffer {lim['max-buffer-size'] >> 20} MiB, "
        f"workgroup memory {lim['max-compute-workgroup-storage-size'] >> 10} KiB, "
        f"storage buffers/stage {lim['max-storage-buffers-per-shader-stage']}; "
        f"features: {', '.join(feats) or 'none'}"
    )


def _preference(adapter) -> tuple[int, int]:
    """Real GPUs before CPU rasterizers (llvmpipe), and native APIs before OpenGL."""
    info = adapter.info
    return _ADAPTER_RANK.get(info["adapter_type"], 3), int(info["backend_type"] == "OpenGL")


def _pack_scalar(v) -> bytes:
    """A Python float is f32, a Python int u32 (i32 if negative); NumPy scalars keep their type."""
    if isinstance(v, (float, np.floating)):
        return struct.pack("<f", v)
    if isinstance(v, np.signedinteger) or (isinstance(v, int) and v < 0):
        return struct.pack("<i", v)
    return struct.pack("<I", v)


def _pack_params(values) -> bytes:
    """A uniform struct of 4-byte scalars (padded to 16 bytes by _uniform_bytes)."""
    return b"".join(_pack_scalar(v) for v in values)


def _groups(n: int) -> tuple[int, int, int]:
    """A grid of n workgroups, folded into 2-D past the per-dimension limit (kernels use linear_group)."""
    n = max(1, n)
    return (min(n, _MAX_GROUPS), -(-n // _MAX_GROUPS), 1)


def _split_bits(v: np.ndarray, bits: int) -> np.ndarray:
    mant, exp = np.frexp(v)
    return np.ldexp(np.round(mant * (1 << bits)), exp - bits)


def _rope_turns(rope: Rope, head_dim: int) -> np.ndarray:
    """inv_freq / 2pi per pair (scaling included), split into 4 f32 pieces so that pos * piece is exact for
    pos < 2^18 (rope.wgsl); one more row after the head_dim / 2 pairs holds the cos/sin scale (mscale, yarn) in x."""
    g = rope.inv_freq(head_dim) / (2 * np.pi)
    pieces = []
    for _ in range(3):
        pieces.append(_split_bits(g, 6))
        g = g - pieces[-1]
    pieces.append(g)
    scale = np.array([[rope.mscale, 0.0, 0.0, 0.0]])
    return np.concatenate([np.stack(pieces, axis=1), scale]).astype(np.float32)


_WEIGHT_GLOBALS = ("wq", "wd", "wh")
_GEMV_MODES = {0: "plain", 1: "res", 2: "glu", 3: "qkv"}


def _top_level(text: str) -> list[str]:
    """A WGSL snippet's top-level items: each function (from `fn` to its closing `}` line) or a single line."""
    items, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        j = i
        if lines[i].startswith("fn "):
            while lines[j] != "}":
                j += 1
        items.append("\n".join(lines[i : j + 1]))
        i = j + 1
    return items


def _weight_copies(text: str, n: int) -> str:
    """n copies of a weight format snippet for the fused GEMVs' n weights: copy s binds its arrays at 8 + 3s.. and
    renames them and every function that reads them (unit_dot -> unit_dot_<s>); pure helpers appear once."""
    items = _top_level(text)
    names = set(_WEIGHT_GLOBALS)
    fns = {m.group(1): it for it in items if (m := re.match(r"fn (\w+)", it))}
    changed = True
    while changed:  # a function that calls a renamed one is renamed too
        changed = False
        for name, body in fns.items():
            if name not in names and any(re.search(rf"\b{g}\b", body) for g in names):
                names.add(name)
                changed = True
    pattern = re.compile(r"\b(" + "|".join(sorted(names)) + r")\b")

    def per_copy(it: str) -> bool:
        return bool(pattern.search(it)) and not it.startswith("//")

    out = [it for it in items if not per_copy(it)]
    for s in range(n):
        for it in filter(per_copy, items):
            it = re.sub(r"@binding\((\d+)\)", lambda m, s=s: f"@binding({int(m.group(1)) + 3 * s})", it)
            out.append(pattern.sub(lambda m, s=s: f"{m.group(1)}_{s}", it))
    return "\n".join(out)


def _rows_dot(n: int, mode: int) -> str:
    """rows_dot: adds each GEMV row's dot product with one x unit to acc, calling the weight copy (unit_dot_<s>) the
    row reads with no branch per row, so the rows' weight loads can go out together: the SwiGLU GEMV's rows
    alternate gate, up (segment r % 2, fixed once the driver unrolls the loop); the other GEMVs' segment is the
    same for every row of a workgroup (one branch per unit, around all rows)."""
    head = (
        "fn rows_dot(seg: u32, rows: array<vec2<u32>, RPW>, u: u32, K: u32, xv: array<vec4<f32>, 8>,\n"
        "            acc: ptr<function, array<f32, NR>>) {"
    )
    if mode == 2:
        body = [
            "    for (var r = 0u; r < RPW; r += 2u) {",
            "        (*acc)[r] += unit_dot_0(rows[r].y, u, K, xv);",
            "        (*acc)[r + 1u] += unit_dot_1(rows[r + 1u].y, u, K, xv);",
            "    }",
        ]
    else:
        loop = "for (var r = 0u; r < RPW; r++) {{ (*acc)[r] += unit_dot_{}(rows[r].y, u, K, xv); }}"
        body = [f"    if (seg == {s}u) {{\n        {loop.format(s)}\n        return;\n    }}" for s in range(n - 1)]
        body.append(f"    {loop.format(n - 1)}")
    return "\n".join([head, *body, "}"])


@dataclass
class _Part:
    """Rows [row0, row0 + rows) of a weight matrix: its buffers in binding order (8, 9) with their sizes."""

    row0: int
    rows: int
    buffers: list


@dataclass(frozen=True)
class WgpuKernel:
    """A compiled user kernel (see WgpuDevice.compile)."""

    name: str
    pipeline: Any


class WgpuDevice(OpRecorder, Device):
    backend = "wgpu"
    records_steps = True  # decode steps are recorded per batch shape (replay)

    def __init__(self, index: int | None = None, timestamps: bool = False):
        """index: the adapter (None: the preferred one). timestamps: request the features timeline() needs."""
        super().__init__()
        # Mesa's EGL prints "XDG_RUNTIME_DIR is invalid" per adapter probe on headless machines; give it a folder.
        os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
        self.adapters = wgpu.gpu.enumerate_adapters_sync()
        if not self.adapters:
            raise BackendUnavailable(
                "wgpu: no WebGPU adapter found; install a GPU driver with Vulkan/Metal/D3D12 "
                "support, or Mesa's lavapipe (apt-get install mesa-vulkan-drivers) for a CPU one"
            )
        if index is None:
            index = min(range(len(self.adapters)), key=lambda i: _preference(self.adapters[i]))
        if not 0 <= index < len(self.adapters):
            raise BackendUnavailable(f"wgpu: no adapter {index}; found {len(self.adapters)} (see `kiln devices`)")
        self.index = index
        self.adapter = adapter = self.adapters[index]
        self._checks = _runtime_checks(adapter.info["adapter_type"])  # naga's runtime checks for kiln's kernels
        features = [f for f in ("shader-f16", _subgroup_feature(adapter.features)) if f and f in adapter.features]
        if timestamps:
            missing = {"timestamp-query", "timestamp-query-inside-passes"} - set(adapter.features)
            if missing:
                raise UnsupportedOp(f"wgpu: {adapter.info['device']} lacks {sorted(missing)} (needed for timestamps)")
            features += ["timestamp-query", "timestamp-query-inside-passes"]
        limits = {k: adapter.limits[k] for k in _LIMITS if k in adapter.limits}
        self.device = adapter.request_device_sync(required_features=features, required_limits=limits)
        self.has_f16 = "shader-f16" in features
        self.has_subgroups = _subgroup_feature(features) is not None
        self.kv_dtype = "f16" if self.has_f16 else "f32"
        # GEMV shape: threads per workgroup (a power of two) and rows per workgroup sharing each x load. A CPU
        # adapter runs a workgroup as SIMD loops where every load is a gather: few threads, many rows (x reuse).
        self.cpu_adapter = adapter.info["adapter_type"] == "CPU"
        # lavapipe: 8 x 8 decodes as fast as 8 x 32 and compiles the fused kernels faster (CI time). GPUs: None,
        # a shape per matrix (_gemv_shape). KILN_WGPU_GEMV=THREADSxROWS fixes one, for experiments.
        self.gemv_tpr, self.gemv_rpw = (8, 8) if self.cpu_adapter else (None, None)
        shape = os.environ.get("KILN_WGPU_GEMV")
        if shape:
            self.gemv_tpr, self.gemv_rpw = (int(v) for v in shape.lower().split("x"))
        self.use_subgroups = self.has_subgroups  # GEMV reductions; tests turn it off to cover the other path
        # Prompts (T > 1) take the tiled GEMM on GPUs; on a CPU adapter T GEMVs in one dispatch are ~10x faster
        # (workgroup memory and barriers are expensive there). Tests set force_gemm to cover the GEMM anyway.
        self.force_gemm = False
        # Decode attention kernel and shape: see set_attention; KILN_WGPU_ATTN=SPLITSxCHUNK for experiments.
        self._attn_tickets: dict[int, Any] = {}
        self.attn3_lanes: int | None = None  # attn_decode3 lanes per key (None: by head dim); tests set it
        shape = os.environ.get("KILN_WGPU_ATTN")
        self.set_attention(None, tuple(int(v) for v in shape.lower().split("x")) if shape else None)
        self.max_binding = (
            min(self.device.limits["max-storage-buffer-binding-size"], self.device.limits["max-buffer-size"]) & ~255
        )
        info = adapter.info
        kind = {"DiscreteGPU": "GPU", "IntegratedGPU": "integrated GPU"}.get(info["adapter_type"], info["adapter_type"])
        self.name = f"wgpu: {info['device']} ({info['backend_type']}, {kind})"
        acts = {"f32", "f16"} if self.has_f16 else {"f32"}
        weights = set(_FORMATS)
        self.SUPPORTED_OPS = {
            "embed": weights,
            "matmul": weights | {"f32"},
            "rms_norm": {"F32", "F16", "BF16"} | acts,
            "rope": acts,
            "attention": acts,
            "swiglu": acts,
            "add": acts,
            "gather_rows": acts | {"i32"},
            "argmax": acts,
        }
        self.queue = self.device.queue
        self.pool = BufferPool(self._make_buffer, lambda b: b.destroy())
        # Owned tensors: id -> (weakref, buffer, bucket size). The weakref tells a live owner from a new object that
        # reuses a dead one's id, and gives the buffer of a tensor dropped without free() back to the pool.
        self._live: dict[int, tuple[Any, Any, int]] = {}
        self._weight_buffers: dict[int, Any] = {}  # id(buffer) -> buffer, for close()
        self.weight_bytes = self.const_bytes = 0
        self._pipelines: dict[tuple, Any] = {}
        self._uniforms: dict[bytes, Any] = {}
        self._bind_groups: dict[tuple, Any] = {}
        self._scratch: dict[tuple, Tensor] = {}  # internal tensors (attention partials, argmax result, ...)
        self._rope_tables: dict[tuple, Any] = {}
        self._staging = None
        self._token_staging: dict[int, list] = {}  # argmax_into's staging buffers: two per size, used in turn
        self._indexed = _IndexedReads(self.device, self.queue) if _wgpu_native else None
        self._token_turn = 0
        self._encoder = self._pass = None
        self.dispatches = 0  # recorded dispatches, for tests and benchmarks
        # replay(): the decode step's dispatches (pipeline, bind group, workgroups), recorded once and re-encoded
        # each token without going through the ops again; dropped whenever a buffer they bind may change.
        self._steps: dict[Any, list[tuple]] = {}
        self._recording: list[tuple] | None = None
        self._rec: list[tuple] | None = None  # the step's ops while replay() records them for the fusion pass
        self.plans: dict[Any, list[str]] = {}  # the op names of each recorded step's (fused) plan, for tests
        self.fuse_enabled = os.environ.get("KILN_WGPU_FUSE", "1") != "0"
        self._fuser = Fuser(self._tid, self._gemv_ok, kv_dtype=self.kv_dtype)
        self.max_storage_buffers = self.device.limits["max-storage-buffers-per-shader-stage"]
        lim = self.device.limits
        wg = min(1024, lim["max-compute-invocations-per-workgroup"], lim["max-compute-workgroup-size-x"])
        self.argmax_wg = 1 << (wg.bit_length() - 1)  # a power of two (the reduction tree halves it)
        # Command buffers finished ahead of the open encoder (submitted first), and the decode step encoded ahead
        # of its replay (key, command buffer): see _preencode. KILN_WGPU_PREENCODE=0 turns that off.
        self._pending: list = []
        self._ready: tuple | None = None
        self._last_step = None
        self.preencoded = 0  # replays that submitted a step encoded ahead (tests, benchmarks)
        self.preencode_enabled = os.environ.get("KILN_WGPU_PREENCODE", "1") != "0"
        # Bound where an optional input (a bias) is absent.
        self._dummy = self._make_weight_buffer(np.zeros(4, np.float32), const=True)

    # --- discovery ----------------------------------------------------------------------------------------------
    def describe(self) -> str:
        """Every adapter wgpu sees, the chosen one marked."""
        lines = [self.name]
        for i, adapter in enumerate(self.adapters):
            mark = "*" if i == self.index else " "
            lines.append(f"  {mark} " + _adapter_line(i, adapter))
        return "\n".join(lines)

    # --- memory -------------------------------------------------------------------------------------------------
    def _make_buffer(self, size: int):
        return self.device.create_buffer(size=size, usage=_STORAGE)

    def _make_weight_buffer(self, data: np.ndarray, const: bool = False):
        """An exact-size buffer holding `data`: a model weight, or (const) a device-owned table kept until close."""
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        size = _ceil16(data.nbytes)  # whole vec4s: kernels read weights as array<vec4<...>>
        buf = self.device.create_buffer(size=size, usage=_STORAGE)
        if data.nbytes:
            self.queue.write_buffer(buf, 0, data if data.nbytes == size else np.pad(data, (0, size - data.nbytes)))
        self._weight_buffers[id(buf)] = buf
        if const:
            self.const_bytes += size
        else:
            self.weight_bytes += size
        return buf

    def _destroy_weight_buffer(self, buf) -> None:
        if self._weight_buffers.pop(id(buf), None) is not None:
            self.weight_bytes -= buf.size
            buf.destroy()

    def empty(self, shape, dtype="f32") -> Tensor:
        nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
        buf, size = self.pool.take(nbytes)
        tensor = Tensor(self, shape, dtype, (buf, 0, nbytes))
        self._live[id(tensor)] = (weakref.ref(tensor, partial(self._reclaim, id(tensor))), buf, size)
        return tensor

    def view(self, tensor: Tensor, offset: int, shape) -> Tensor:
        buf, base, nbytes = tensor.storage
        itemsize = np.dtype(DTYPES[tensor.dtype]).itemsize
        start, size = offset * itemsize, math.prod(shape) * itemsize
        if start % 256:
            raise ValueError(f"wgpu views must start at a multiple of 256 bytes (got byte offset {start})")
        if start + size > nbytes:
            raise ValueError(f"view [{offset}, {offset + math.prod(shape)}) is outside a tensor of {tensor.size}")
        return Tensor(self, shape, tensor.dtype, (buf, base + start, size))

    def write(self, tensor: Tensor, array: np.ndarray) -> None:
        self.flush()  # recorded work that reads this tensor must run before the queue overwrites it
        buf, offset, nbytes = tensor.storage
        data = np.ascontiguousarray(array, DTYPES[tensor.dtype]).reshape(-1).view(np.uint8)
        if data.nbytes != nbytes:
            raise ValueError(f"write of {data.nbytes} bytes into a tensor of {nbytes}")
        if nbytes % 4:  # pad to a whole word; a view keeps its neighbours' bytes (read back: rare, odd f16 views)
            owned = self._owns(tensor)
            tail = np.zeros(4, np.uint8) if owned else self._read_bytes(buf, offset + nbytes - nbytes % 4, 4)
            data = np.concatenate([data, tail[nbytes % 4 :]])
        if data.nbytes:
            self.queue.write_buffer(buf, offset, data)

    def download(self, tensor: Tensor) -> np.ndarray:
        buf, offset, nbytes = tensor.storage
        raw = self._read_bytes(buf, offset, nbytes)
        return raw.view(DTYPES[tensor.dtype]).reshape(tensor.shape).copy()

    def _read_bytes(self, buf, offset: int, nbytes: int) -> np.ndarray:
        """Flush, copy [offset, offset + nbytes) into the persistent staging buffer, map and read it."""
        size = _ceil4(nbytes)
        if self._staging is None or self._staging.size < size:
            if self._staging is not None:
                self._staging.destroy()
            self._staging = self._map_buffer(self.pool.bucket(size))
        self._submit_copy(buf, offset, self._staging, size)
        return self._read_mapped(self._staging, size)[:nbytes]

    def _map_buffer(self, size: int):
        return self.device.create_buffer(size=size, usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)

    def _submit_copy(self, buf, offset: int, staging, size: int) -> int | None:
        """Submit the recorded work and a copy of [offset, offset + size) into `staging`; then, while the device
        runs them, encode the next decode step (_preencode). Returns the submission's index (_IndexedReads)."""
        encoder = self._end_pass() or self.device.create_command_encoder()
        encoder.copy_buffer_to_buffer(buf, offset, staging, 0, size)
        buffers, self._pending = [*self._pending, encoder.finish()], []
        index = None
        if self._indexed:
            index = self._indexed.submit(buffers)
        else:
            self.queue.submit(buffers)  # returns nothing: read_token then maps through wgpu-py
        self._preencode()
        return index

    @staticmethod
    def _read_mapped(staging, size: int) -> np.ndarray:
        staging.map_sync(wgpu.MapMode.READ, 0, size)  # waits for the submitted copy
        try:
            return np.frombuffer(staging.read_mapped(0, size), np.uint8).copy()
        finally:
            staging.unmap()

    def _owns(self, tensor: Tensor) -> bool:
        entry = self._live.get(id(tensor))
        return entry is not None and entry[0]() is tensor

    def _reclaim(self, key: int, ref) -> None:
        """Weakref callback: a tensor died without free(); its buffer goes back to the pool."""
        entry = self._live.get(key)
        if entry is not None and entry[0] is ref:
            del self._live[key]
            self._forget_steps()
            if self.device is not None:
                self.pool.give(entry[1], entry[2])

    def free(self, tensor: Tensor) -> None:
        if not self._owns(tensor):
            raise ValueError("free() of a tensor this device does not own (a view, or freed twice)")
        self._forget_steps()  # a recorded step may bind this buffer, which the pool can now hand out again
        _, buf, size = self._live.pop(id(tensor))
        self.pool.give(buf, size)
        tensor.storage = None

    def memory_stats(self) -> dict:
        uniform_bytes = sum(b.size for b in self._uniforms.values())
        return {
            **self.pool.stats(),
            "weight_bytes": self.weight_bytes,
            "const_bytes": self.const_bytes,
            "uniform_bytes": uniform_bytes,
            "pipelines": len(self._pipelines),
            "bind_groups": len(self._bind_groups),
        }

    # --- weights ------------------------------------------------------------------------------------------------
    def load_weight(self, name, qtype, raw, shape) -> Weight:
        weight = Weight(name, qtype, tuple(shape))
        fmt = qtype.name
        if len(shape) == 1:  # norms and biases: f32, whatever the file stores
            values = quant.dequantize(np.asarray(raw).reshape(1, -1).view(np.uint8), qtype, shape[0])[0]
            weight.storage = self._make_weight_buffer(values)
            return weight
        if fmt not in _FORMATS:
            raise UnsupportedOp(f"backend 'wgpu' does not support {fmt} weights ({name})")
        rows, cols = shape
        arrays = self._repack(fmt, np.asarray(raw).reshape(rows, -1).view(np.uint8))
        row_bytes = max(a.shape[1] for a in arrays)
        per_part = max(1, self.max_binding // max(1, row_bytes))
        weight.storage = [
            _Part(r0, min(per_part, rows - r0), [self._make_weight_buffer(a[r0 : r0 + per_part]) for a in arrays])
            for r0 in range(0, rows, per_part)
        ]
        weight.extra["fmt"] = _FORMATS[fmt]
        return weight

    @staticmethod
    def _repack(fmt: str, raw: np.ndarray) -> list[np.ndarray]:
        """The per-row arrays of a matrix in binding order (see _REPACK)."""
        if fmt not in _REPACK:
            return [raw]
        size, fields = _REPACK[fmt]
        blocks = raw.reshape(raw.shape[0], -1, size)
        return [np.ascontiguousarray(blocks[..., a:b]).reshape(raw.shape[0], -1) for a, b in fields]

    def free_weight(self, weight: Weight) -> None:
        if weight.storage is None:
            return
        self.flush()  # recorded dispatches may still use these buffers
        parts = weight.storage if isinstance(weight.storage, list) else [_Part(0, 0, [weight.storage])]
        for part in parts:
            for buf in part.buffers:
                self._destroy_weight_buffer(buf)
        self._bind_groups.clear()  # they may reference the destroyed buffers
        self._forget_steps()
        weight.storage = None
        weight.extra.clear()

    # --- recording ----------------------------------------------------------------------------------------------
    def _compute_pass(self):
        if self._pass is None:
            self._encoder = self.device.create_command_encoder()
            self._pass = self._encoder.begin_compute_pass()
        return self._pass

    def _end_pass(self):
        """End the open pass; returns its encoder (or None) for the caller to finish and submit."""
        encoder = self._encoder
        if self._pass is not None:
            self._pass.end()
        self._encoder = self._pass = None
        return encoder

    def flush(self) -> None:
        encoder = self._end_pass()
        buffers = [*self._pending, encoder.finish()] if encoder is not None else self._pending
        self._pending = []
        if buffers:
            self.queue.submit(buffers)

    def sync(self) -> None:
        self._read_bytes(self._dummy, 0, 4)  # a mapped read completes only after all submitted work

    def _source(self, kernel: str, fmt: str | None, defs: dict) -> str:
        """Header (enable f16, aliases, constants) + common helpers + weight snippet (+ GEMV parts) + kernel."""
        head = ["enable f16;"] if self.has_f16 else []
        for key, value in sorted(defs.items()):
            head.append(f"alias {key} = {value};" if isinstance(value, str) else f"const {key}: u32 = {value}u;")
        parts = ["\n".join(head), (_KERNELS / "common.wgsl").read_text()]
        if fmt is not None:
            snippet = (_KERNELS / f"w_{fmt}.wgsl").read_text()
            if fmt in ("f32", "f16", "bf16"):
                snippet += "\n" + (_KERNELS / "w_float.wgsl").read_text()
            if fmt in ("q4_k", "q5_k"):
                snippet += "\n" + (_KERNELS / "k_scales.wgsl").read_text()
            parts.append(_weight_copies(snippet, defs["NW"]) if kernel == "gemv" else snippet)
        if kernel == "gemv":
            parts.append(_rows_dot(defs["NW"], defs["MODE"]))
            norm = "on" if defs["NR"] > defs["RPW"] else "off"
            parts.append((_KERNELS / f"gemv_norm_{norm}.wgsl").read_text())
            parts.append((_KERNELS / ("reduce_sg.wgsl" if self.use_subgroups else "reduce_wg.wgsl")).read_text())
            parts.append((_KERNELS / "reduce_tree.wgsl").read_text())
            parts.append((_KERNELS / f"gemv_out_{_GEMV_MODES[defs['MODE']]}.wgsl").read_text())
        if kernel.startswith("attn_"):
            parts.append((_KERNELS / "attn_params.wgsl").read_text())
        if kernel in ("attn_decode", "attn_decode2", "attn_decode3"):
            parts.append((_KERNELS / "attn_decode_inputs.wgsl").read_text())
        if kernel in ("attn_decode2", "attn_decode3"):
            parts.append((_KERNELS / "attn_last_split.wgsl").read_text())
        if kernel == "attn_decode3":  # its entry point: with subgroup shuffles or without
            parts.append((_KERNELS / f"attn_decode3_{'sg' if self.use_subgroups else 'wg'}.wgsl").read_text())
        parts.append((_KERNELS / f"{kernel}.wgsl").read_text())
        return "\n".join(parts)

    def _pipeline(self, kernel: str, entry: str = "main", fmt: str | None = None, **defs):
        key = (kernel, entry, fmt, self.use_subgroups, tuple(sorted(defs.items())))
        pipeline = self._pipelines.get(key)
        if pipeline is None:
            module = _shader_module(self.device, kernel, self._source(kernel, fmt, defs), self._checks)
            name = f"{kernel}_{_GEMV_MODES[defs['MODE']]}" if "MODE" in defs else kernel  # timeline() reads it
            pipeline = self.device.create_compute_pipeline(
                label=f"{name}:{entry}", layout="auto", compute={"module": module, "entry_point": entry}
            )
            self._pipelines[key] = pipeline
        return pipeline

    def _uniform(self, values) -> Any:
        return self._uniform_bytes(_pack_params(values))

    def _uniform_bytes(self, data: bytes) -> Any:
        """A uniform buffer holding `data`, shared by every dispatch with the same parameters."""
        data = bytes(data).ljust(max(16, -(-len(data) // 16) * 16), b"\0")
        buf = self._uniforms.get(data)
        if buf is None:
            if len(self._uniforms) >= 4096:  # bounded: prompts of many sizes each bring their own parameters
                self._drop_uniforms()
            buf = self.device.create_buffer(size=len(data), usage=wgpu.BufferUsage.UNIFORM | wgpu.BufferUsage.COPY_DST)
            self.queue.write_buffer(buf, 0, data)  # a new buffer: no recorded work reads it yet
            self._uniforms[data] = buf
        return buf

    def _drop_uniforms(self) -> None:
        self.flush()
        for buf in self._uniforms.values():
            buf.destroy()
        self._uniforms.clear()
        self._bind_groups.clear()
        self._forget_steps()

    def replay(self, key: Any, step) -> None:
        """Decode steps (every attention run one token long) are recorded once per key (the caller's full identity
        of the step), then re-encoded from the list: no per-op Python work per token. Valid because every per-step
        input (ids, positions, slots, block tables) is read from device buffers and a decode step's dispatches
        depend only on its shapes. Other steps (prompt chunks: dispatches per run) run op by op.

        Recording runs the step's ops as (name, args) first, rewrites steps of one token with the fusion pass
        (fusion.py: norm + QKV + RoPE + KV write, norm + gate/up + SwiGLU, matmul + residual add, norm + matmul)
        unless KILN_WGPU_FUSE=0, then runs the plan and keeps its dispatches."""
        recorded = self._steps.get(key)
        if recorded is None:
            self._rec = []
            try:
                step()
            finally:
                ops, self._rec = self._rec, None
            if not all(args[5].decode for name, args in ops if name == "attention"):
                for name, args in ops:
                    self._run_op(name, args)
                return
            one_token = all(args[0].shape[0] == 1 for name, args in ops if name == "matmul")
            plan = self._fuser.fuse(ops) if self.fuse_enabled and one_token else ops
            self._recording = []
            try:
                for name, args in plan:
                    getattr(self, "_do_" + name)(*args)
                self._steps[key] = self._recording
                self.plans[key] = [name for name, _ in plan]
                self._last_step = key
            finally:
                self._recording = None
            return
        self.dispatches += len(recorded)
        ready, self._ready = self._ready, None
        self._last_step = key
        if ready is not None and ready[0] == key:  # encoded while the previous token ran (_preencode)
            self.preencoded += 1
            encoder = self._end_pass()
            self._pending += [encoder.finish(), ready[1]] if encoder is not None else [ready[1]]
            return
        self._encode(self._compute_pass(), recorded)

    @staticmethod
    def _encode(cp, recorded: list) -> None:
        """Re-encode recorded dispatches. Through wgpu-native's C functions where wgpu-py runs on it: wgpu-py's
        methods cost ~2.3 us of Python per dispatch (3.1 against 0.8 us on this project's CI host), more than
        wgpu-native then spends on it at finish(), and a decode step re-encodes ~100-500 dispatches per token.
        The calls only repeat ones the recording made through wgpu-py, which validated them."""
        if _wgpu_native is None:
            for pipeline, group, groups in recorded:
                cp.set_pipeline(pipeline)
                cp.set_bind_group(0, group)
                cp.dispatch_workgroups(*groups)
            return
        lib, handle, null = _wgpu_native.lib, cp._internal, _wgpu_native.ffi.NULL
        set_pipeline, set_group = lib.wgpuComputePassEncoderSetPipeline, lib.wgpuComputePassEncoderSetBindGroup
        dispatch = lib.wgpuComputePassEncoderDispatchWorkgroups
        for pipeline, group, (x, y, z) in recorded:
            set_pipeline(handle, pipeline._internal)
            set_group(handle, 0, group._internal, 0, null)
            dispatch(handle, x, y, z)

    def _preencode(self) -> None:
        """Encode the last replayed decode step into a command buffer of its own, to be submitted by the next
        replay() of the same step: recording ~100-500 dispatches costs the CPU about a millisecond, which this
        overlaps with the device's work instead of adding it to every token. Nothing is captured but the
        dispatches: the step reads its inputs (ids, positions) from device buffers when it runs."""
        key = self._last_step
        if not self.preencode_enabled or key is None or self._ready is not None or key not in self._steps:
            return
        encoder = self.device.create_command_encoder()
        cp = encoder.begin_compute_pass()
        self._encode(cp, self._steps[key])
        cp.end()
        self._ready = (key, encoder.finish())

    def timeline(self) -> list[tuple[str, float]]:
        """(kernel, microseconds of device time) for each dispatch of the last replayed decode step, run once more
        with a timestamp after every dispatch; the first entry's time runs from the pass's start. Needs
        WgpuDevice(timestamps=True). What the timestamps measure is up to the driver: on Vulkan they are written
        when the work before them has finished, so a dispatch's time includes waiting at its barrier."""
        recorded = self._steps.get(self._last_step)
        if recorded is None:
            raise RuntimeError("timeline(): no decode step has been replayed yet")
        n = len(recorded) + 1
        queries = self.device.create_query_set(type="timestamp", count=n)
        resolved = self.device.create_buffer(size=8 * n, usage=wgpu.BufferUsage.QUERY_RESOLVE | _STORAGE)
        try:
            self.flush()
            encoder = self.device.create_command_encoder()
            cp = encoder.begin_compute_pass()
            cp._write_timestamp(queries, 0)
            for i, dispatch in enumerate(recorded):
                self._encode(cp, [dispatch])
                cp._write_timestamp(queries, i + 1)
            cp.end()
            encoder.resolve_query_set(queries, 0, n, resolved, 0)
            self.queue.submit([encoder.finish()])
            ticks = self._read_bytes(resolved, 0, 8 * n).view(np.uint64).astype(np.float64)
        finally:
            resolved.destroy()
            queries.destroy()
        period_ns = _wgpu_native.libf.wgpuQueueGetTimestampPeriod(self.queue._internal) if _wgpu_native else 1.0
        us = np.diff(ticks) * period_ns / 1e3
        return [(pipeline.label.split(":")[0], float(t)) for (pipeline, _, _), t in zip(recorded, us)]

    def _forget_steps(self) -> None:
        """Drop the recorded steps (a buffer they bind may be freed or reused) and any step encoded ahead."""
        self._steps.clear()
        self._ready = None
        self._last_step = None

    def _dispatch(self, pipeline, bindings: list, groups: tuple[int, int, int]) -> None:
        """Record one dispatch. bindings: (binding index, buffer, offset, size) for each resource."""
        key = (id(pipeline), *bindings)
        group = self._bind_groups.get(key)
        if group is None:
            if len(self._bind_groups) >= 8192:
                self._bind_groups.clear()
            entries = [{"binding": i, "resource": {"buffer": b, "offset": o, "size": s}} for i, b, o, s in bindings]
            group = self.device.create_bind_group(layout=pipeline.get_bind_group_layout(0), entries=entries)
            self._bind_groups[key] = group
        cp = self._compute_pass()
        cp.set_pipeline(pipeline)
        cp.set_bind_group(0, group)
        cp.dispatch_workgroups(*groups)
        self.dispatches += 1
        if self._recording is not None:
            self._recording.append((pipeline, group, groups))

    @staticmethod
    def _bind(index: int, tensor: Tensor) -> tuple:
        """Whole vec4s (kernels may read a tensor as array<vec4<f32>>): pool buckets are multiples of 256 bytes
        and views start at multiples of 256, so rounding up stays inside the buffer."""
        buf, offset, nbytes = tensor.storage
        return (index, buf, offset, min(_ceil16(nbytes), buf.size - offset))

    def _bind_params(self, *values) -> tuple:
        buf = self._uniform(values)
        return (0, buf, 0, buf.size)

    @staticmethod
    def _bind_buffer(index: int, buf) -> tuple:
        return (index, buf, 0, buf.size)

    def _internal(self, key: tuple, shape: tuple, dtype: str = "f32") -> Tensor:
        """A device-owned scratch tensor, reused for every call with the same key."""
        t = self._scratch.get(key)
        if t is None:
            t = self._scratch[key] = self.empty(shape, dtype)
        return t

    # --- user kernels -------------------------------------------------------------------------------------------
    def compile(self, name: str, source: str, trusted: bool = False, **constants: Any) -> WgpuKernel:
        """Compile WGSL `source` (entry point `main`); constants set its `override` declarations.

        Cached by (name, source, trusted, constants). Bind tensors with @group(0) @binding(0..n-1) in launch order,
        and the params struct (if any) as a `var<uniform>` at @binding(n). trusted=True compiles with the runtime
        checks kiln's own kernels use (on GPUs: no loop-bounding counters, see _runtime_checks): only for a kernel
        whose loops are known to end; the default keeps every check wgpu adds.
        """
        key = ("user", name, source, trusted, tuple(sorted(constants.items())))
        pipeline = self._pipelines.get(key)
        if pipeline is None:
            module = _shader_module(self.device, name, source, self._checks if trusted else None)
            stage = {"module": module, "entry_point": "main"}
            if constants:
                stage["constants"] = {k: float(v) if not isinstance(v, bool) else v for k, v in constants.items()}
            pipeline = self.device.create_compute_pipeline(label=name, layout="auto", compute=stage)
            self._pipelines[key] = pipeline
        return WgpuKernel(name, pipeline)

    def launch(self, kernel: WgpuKernel, grid, buffers, params=None, block=None) -> None:
        """Record `kernel` over `grid` workgroups (an int or up to 3 ints). `block` is ignored: the workgroup size
        is the shader's @workgroup_size. params: a sequence of 4-byte scalars (a Python float is f32, a Python int
        u32, i32 if negative; NumPy scalars keep their type) or raw bytes / a NumPy array, bound as a uniform."""
        grid = (grid,) if isinstance(grid, int) else tuple(grid)
        bindings = [self._bind(i, t) for i, t in enumerate(buffers)]
        if params is not None:
            if isinstance(params, np.ndarray):
                buf = self._uniform_bytes(np.ascontiguousarray(params).tobytes())
            elif isinstance(params, (bytes, bytearray)):
                buf = self._uniform_bytes(params)
            else:
                buf = self._uniform(params)
            bindings.append((len(buffers), buf, 0, buf.size))
        self._dispatch(kernel.pipeline, bindings, (*grid, 1, 1)[:3])

    # --- ops: fusion.OpRecorder runs each op now (_do_<name>) or records it for replay()'s fusion pass ----------
    @staticmethod
    def _tid(t: Tensor) -> tuple:
        """What identifies a tensor for the fusion pass: the start of its memory."""
        return (id(t.storage[0]), t.storage[1])

    def _gemv_ok(self, x: Tensor, *weights: Weight) -> bool:
        """One gemv.wgsl dispatch can take x with these weights: f32 x, one part each (no row split), the same
        format and K, and few enough storage bindings for this adapter (13 besides the weights' arrays)."""
        w0 = weights[0]
        if x.dtype != "f32" or (self.gemv_rpw or 2) % 2 or len(x.shape) != 2:  # QKV: RoPE pairs in a workgroup
            return False
        arrays = 0
        for w in weights:
            if not (
                isinstance(w.storage, list)
                and len(w.storage) == 1
                and w.extra.get("fmt") == w0.extra.get("fmt")
                and len(w.shape) == 2
                and w.shape[1] == x.shape[1]
            ):
                return False
            arrays += len(w.storage[0].buffers)
        return 13 + arrays <= self.max_storage_buffers

    # --- fused decode ops (from the fusion pass, T == 1) --------------------------------------------------------
    def _bias_binding(self, index: int, bias) -> tuple:
        return self._bind_buffer(index, bias.storage if bias is not None else self._dummy)

    def _do_gemv_qkv(self, x, norm, wq, wk, wv, bq, bk, bv, q, k, v, kv, rope, hd, kc, vc) -> None:
        ws = (wq, wk, wv)
        bindings = [
            self._bind(2, q),
            self._bias_binding(3, bq),
            self._bind(5, k),
            self._bind(6, v),
            self._bias_binding(7, bk),
            self._bias_binding(17, bv),
            self._bind(18, kv.pos),
            self._bind(19, kc),
            self._bind(20, vc),
            self._bind_buffer(21, self._rope_table(rope, hd)),
            self._bind(22, kv.slot),
        ]
        bits = sum(1 << i for i, b in enumerate((bq, bk, bv)) if b is not None)
        self._gemv(
            3,
            x,
            [w.storage[0] for w in ws],
            wq.extra["fmt"],
            [w.shape[0] for w in ws],
            bindings,
            bias=bits,
            norm=norm,
            rope=(hd, int(rope.neox), kc.shape[1]),
            kv=kc.dtype,
        )

    def _do_gemv_glu(self, x, norm, wg, wu, out, up) -> None:
        bindings = [self._bind(2, out), self._bind(5, up)]
        parts = [wg.storage[0], wu.storage[0]]
        self._gemv(2, x, parts, wg.extra["fmt"], [2 * wg.shape[0]], bindings, norm=norm)

    def _do_gemv_res(self, x, w, bias, out, resid) -> None:
        bindings = [self._bind(2, out), self._bias_binding(3, bias), self._bind(5, resid)]
        self._gemv(1, x, w.storage, w.extra["fmt"], [w.shape[0]], bindings, bias=bias is not None)

    def _do_gemv_norm(self, x, norm, w, bias, out) -> None:
        bindings = [self._bind(2, out), self._bias_binding(3, bias)]
        self._gemv(
            0, x, w.storage, w.extra["fmt"], [w.shape[0]], bindings, N=w.shape[0], bias=bias is not None, norm=norm
        )

    def _rope_table(self, rope: Rope, head_dim: int):
        key = (rope, head_dim)
        table = self._rope_tables.get(key)
        if table is None:
            table = self._rope_tables[key] = self._make_weight_buffer(_rope_turns(rope, head_dim), const=True)
        return table

    def _do_embed(self, weight, ids, out) -> None:
        fmt = weight.extra["fmt"]
        T, d = out.shape
        pipeline = self._pipeline("embed", fmt=fmt)
        groups = _groups(-(-T * -(-d // 8) // 64))
        for part in weight.storage:
            self._dispatch(
                pipeline,
                [
                    self._bind_params(d, part.rows, part.row0, T),
                    self._bind(1, ids),
                    self._bind(2, out),
                    *self._weight_bindings(part),
                ],
                groups,
            )

    @staticmethod
    def _weight_bindings(part: _Part) -> list:
        return [(8 + i, b, 0, b.size) for i, b in enumerate(part.buffers)]

    def _do_rms_norm(self, x, weight, eps, out) -> None:
        self.require_op("rms_norm", x.dtype)
        d = x.shape[-1]
        rows = x.size // d
        pipeline = self._pipeline("rms_norm", act=x.dtype)
        self._dispatch(
            pipeline,
            [
                self._bind_params(d, rows, float(eps)),
                self._bind(1, x),
                self._bind(2, out),
                self._bind_buffer(3, weight.storage),
            ],
            _groups(rows),
        )

    def _do_matmul(self, x, weight, out, bias=None) -> None:
        self.require_op("matmul", x.dtype)
        fmt = weight.extra["fmt"]
        T, K = x.shape
        N = weight.shape[0]
        bias_buf = bias.storage if bias is not None else self._dummy
        if T == 1 or self.cpu_adapter and not self.force_gemm:
            for part in weight.storage:
                bindings = [self._bind(2, out), self._bind_buffer(3, bias_buf)]
                self._gemv(0, x, [part], fmt, [part.rows], bindings, T=T, N=N, row0=part.row0, bias=bias is not None)
            return
        pipeline = self._pipeline("gemm", fmt=fmt)
        for part in weight.storage:
            params = self._bind_params(K, part.rows, part.row0, int(bias is not None), T, N)
            self._dispatch(
                pipeline,
                [
                    params,
                    self._bind(1, x),
                    self._bind(2, out),
                    self._bind_buffer(3, bias_buf),
                    *self._weight_bindings(part),
                ],
                (-(-part.rows // 64), -(-T // 32), 1),
            )

    def _gemv_shape(self, K: int, rows: int, mode: int = 0) -> tuple[int, int]:
        """GEMV threads per row and rows per workgroup: the fixed shape if one is set, else by kind (mode) and size,
        from sweeps on an H200 (Vulkan; bench/NOTES.md). Against one 64 x 4 shape for all: the SwiGLU GEMV 32.0 ->
        19.6 us (TinyLlama, 64 x 8) and 78 -> 52 us (7B, 32 x 8); QKV on 7B 50 -> 36 us (64 x 8); plain and residual
        GEMVs take more threads on longer rows (7B down 33 -> 28 us) and 8 rows on tall matrices with long rows;
        small matrices 2 rows per workgroup (twice the workgroups)."""
        if self.gemv_tpr:
            return self.gemv_tpr, self.gemv_rpw
        small = rows < 2048
        if mode == 2:  # glu
            return (32, 2) if K < 1024 else (64, 8) if K < 4096 else (32, 8)
        if mode == 3:  # qkv
            return (32, 2 if small else 4) if K < 2048 else (64, 4) if K < 4096 else (64, 8)
        rpw = 2 if small else 8 if rows >= 8192 and K >= 2048 else 4
        return (32 if K < 2048 else 64 if K < 4096 else 128), rpw

    def _gemv(
        self,
        mode: int,
        x: Tensor,
        parts: list,
        fmt: str,
        rows: list[int],
        bindings: list,
        T: int = 1,
        N: int = 0,
        row0: int = 0,
        bias: int = 0,
        norm=None,
        rope=(0, 0, 0),  # QKV: head dim, NeoX, cache rows
        kv: str | None = None,
    ) -> None:
        """One dispatch of gemv.wgsl: mode 0 plain, 1 residual, 2 SwiGLU, 3 QKV (gemv_out_<mode>.wgsl) over the
        weight parts `parts` (one per segment) with `rows` logical rows each; `bindings` are the epilogue's."""
        tpr, rpw = self._gemv_shape(x.shape[1], sum(rows), mode)
        defs = {"TPR": tpr, "RPW": rpw, "NR": rpw + int(norm is not None), "NW": len(parts), "MODE": mode}
        if kv is not None:
            defs["kv"] = kv
        pipeline = self._pipeline("gemv", fmt=fmt, **defs)
        groups = [-(-n // rpw) for n in rows]
        n = [*rows, 0, 0][:3]
        starts = [sum(groups[:1]), sum(groups[:2])] if len(groups) > 1 else [0xFFFFFFFF, 0xFFFFFFFF]
        if len(groups) == 2:
            starts[1] = 0xFFFFFFFF
        K = x.shape[1]
        eps = float(norm[1]) if norm is not None else 0.0
        params = self._bind_params(K, N, row0, int(bias), *n, *starts, eps, *rope)  # gemv.wgsl Params
        all_bindings = [params, self._bind(1, x), *bindings]
        if norm is not None:
            all_bindings.append(self._bind_buffer(4, norm[0].storage))
        for s, part in enumerate(parts):
            all_bindings += [(8 + 3 * s + i, b, 0, b.size) for i, b in enumerate(part.buffers)]
        total = sum(groups)
        self._dispatch(pipeline, all_bindings, (min(total, _MAX_GROUPS), T, -(-total // _MAX_GROUPS)))

    def _do_rope(self, x, pos, n_heads, head_dim, rope) -> None:
        self.require_op("rope", x.dtype)
        T = x.shape[0]
        table = self._rope_table(rope, head_dim)
        pipeline = self._pipeline("rope", act=x.dtype)
        n = T * n_heads * (head_dim // 2)
        self._dispatch(
            pipeline,
            [
                self._bind_params(T, n_heads, head_dim, int(rope.neox)),
                self._bind(1, x),
                self._bind(2, pos),
                self._bind_buffer(3, table),
            ],
            _groups(-(-n // 64)),
        )

    def _do_attention(self, q, k, v, k_cache, v_cache, kv, out, n_heads, n_kv_heads, head_dim) -> None:
        self.require_op("attention", q.dtype)
        self._check_head_dim(head_dim)
        T = q.shape[0]
        n_ctx = k_cache.shape[1]
        width = n_kv_heads * head_dim
        self._dispatch(
            self._pipeline("kv_write", act=q.dtype, kv=k_cache.dtype),
            [
                self._bind_params(T, n_kv_heads, head_dim, n_ctx),
                self._bind(1, k),
                self._bind(2, v),
                self._bind(3, k_cache),
                self._bind(4, v_cache),
                self._bind(5, kv.slot),
            ],
            _groups(-(-T * width // 64)),
        )
        self._do_attend(q, k_cache, v_cache, kv, out, n_heads, n_kv_heads, head_dim)

    @staticmethod
    def _check_head_dim(head_dim: int) -> None:
        if head_dim % 4 or head_dim > 256:
            raise UnsupportedOp(
                f"backend 'wgpu' attention needs head_dim a multiple of 4, at most 256 (got {head_dim})"
            )

    def set_attention(self, kernel: str | None = None, shape: tuple[int, int] | None = None) -> None:
        """Decode attention kernel: v1 (attn_decode + attn_combine; SPLITS x CHUNK = splits per KV head x keys per
        chunk), v2 (attn_decode2, one dispatch; SPLITS x CHUNK = most splits per KV head x keys per tile) or v3
        (attn_decode3, one dispatch, no barrier per tile; SPLITS x CHUNK as v2, see _attn3_defs), and its shape.
        Defaults: KILN_WGPU_ATTN_KERNEL, else on GPUs v2, and v3 for models with one query head per KV head (H200,
        Vulkan, wgpu_kernels.py --attn: v3 1.1-1.9x faster than v2 for 7B heads, 0.6-0.8x for TinyLlama's; decode of
        TinyLlama 327 vs 360 tok/s, SmolLM2 441 vs 449 with v3), and v1 on CPU adapters (lavapipe: v1 1x256 up to 4.5x
        faster than v2 4x64 for 7B heads, slower only for TinyLlama's at 64 keys; v3 0.3-0.9x v2 there: built for
        wide GPU subgroups); the kernel's own shape for this adapter.
        Steps recorded before keep their kernel (callers switching mid-run drop them: _forget_steps)."""
        kernel = kernel or os.environ.get("KILN_WGPU_ATTN_KERNEL")
        self.attn_v3_without_gqa = kernel is None and not self.cpu_adapter
        kernel = kernel or ("v1" if self.cpu_adapter else "v2")
        if kernel not in _ATTN_SHAPES:
            raise ValueError(f"wgpu attention kernel must be one of {sorted(_ATTN_SHAPES)} (got {kernel!r})")
        self.attn_kernel = kernel
        self.attn_splits, self.attn_chunk = shape or _ATTN_SHAPES[kernel][self.cpu_adapter]

    def _do_attend(self, q, k_cache, v_cache, kv, out, n_heads, n_kv_heads, head_dim) -> None:
        """Attention of each token over its sequence's positions <= pos[t], read through the block table (the caches
        already hold this step's keys and values). A decode step is one decode dispatch over all tokens; otherwise
        each prompt run gets a prefill dispatch and each span of one-token runs a decode dispatch."""
        self._check_head_dim(head_dim)
        T = q.shape[0]
        types = {"act": q.dtype, "kv": k_cache.dtype}
        inputs = [
            self._bind(1, q),
            self._bind(2, k_cache),
            self._bind(3, v_cache),
            self._bind(4, kv.pos),
            self._bind(8, kv.seq),
            self._bind(9, kv.table),
        ]
        shape = (T, n_heads, n_kv_heads, k_cache.shape[1], head_dim, kv.block_size, kv.table.shape[1])
        for first, n, row in kv.launches():
            if row < 0:
                self._attend_decode(shape, types, inputs, out, first, n)
                continue
            self._dispatch(
                self._pipeline("attn_prefill", HD=head_dim, **types),
                [self._attn_params(shape, 1, first, n), *inputs, self._bind(5, out)],
                (-(-n // 64), n_heads, 1),
            )

    def _attend_decode(self, shape: tuple, types: dict, inputs: list, out, t0: int, n: int) -> None:
        """The decode kernel over tokens t0 .. t0 + n (one workgroup row per token, each of its own sequence)."""
        n_heads, n_kv_heads = shape[1], shape[2]
        if self.attn_kernel == "v1":
            self._attend_split_combine(shape, types, inputs, out, t0, n)
        else:
            v3 = self.attn_kernel == "v3" or (self.attn_v3_without_gqa and n_heads == n_kv_heads)
            self._attend_one_dispatch(shape, types, inputs, out, "v3" if v3 else "v2", t0, n)

    def _attn_params(self, shape: tuple, splits: int, t0: int, n: int) -> tuple:
        T, n_heads, n_kv_heads, n_ctx, head_dim, block, width = shape
        scale = float(np.float32(1.0 / np.sqrt(head_dim)))
        return self._bind_params(T, n_heads, n_kv_heads, n_ctx, splits, scale, t0, n, block, width)  # attn_params

    def _attend_split_combine(self, shape: tuple, types: dict, inputs: list, out, t0: int, n: int) -> None:
        """v1: attn_decode (fixed splits, chunks strided over them) then attn_combine; one split: no combine."""
        T, n_heads, n_kv_heads, n_ctx, head_dim = shape[:5]
        chunk = self.attn_chunk
        splits = max(1, min(self.attn_splits, -(-n_ctx // chunk)))
        direct = int(splits == 1 and out.dtype == "f32")  # one dispatch: the kernel writes the output itself
        partial = out
        if not direct:
            partial = self._internal(
                ("attn_partial", T, n_heads, splits, head_dim), (T * n_heads * splits * (head_dim + 2),)
            )
        params = self._attn_params(shape, splits, t0, n)
        nv = head_dim // 4
        gq = n_heads // n_kv_heads
        self._dispatch(
            self._pipeline("attn_decode", HD=head_dim, NV=nv, G=64 // nv, GQ=gq, CHUNK=chunk, DIRECT=direct, **types),
            [params, *inputs, self._bind(5, partial)],
            (splits, n_kv_heads, n),
        )
        if not direct:
            self._dispatch(
                self._pipeline("attn_combine", HD=head_dim, NS=splits, act=types["act"]),
                [params, self._bind(1, partial), self._bind(2, out)],
                (n_heads, n, 1),
            )

    def _attend_one_dispatch(self, shape: tuple, types: dict, inputs: list, out, version: str, t0: int, n: int) -> None:
        """v2 / v3: attn_decode2 / attn_decode3, splits merged by the last one to finish (atomic tickets, zero
        between dispatches; both kernels share them)."""
        T, n_heads, n_kv_heads, n_ctx, head_dim = shape[:5]
        kernel, make_defs = {"v2": ("attn_decode2", self._attn2_defs), "v3": ("attn_decode3", self._attn3_defs)}[
            version
        ]
        defs = make_defs(head_dim, n_heads // n_kv_heads, n_ctx, types["kv"])
        ns = defs["NS"]
        n_part = T * n_kv_heads * ns * (defs["E"] * 4 + defs["GQ"] * 2)
        part = self._internal(("attn_part2", n_part), (n_part,))
        tickets = self._attn_tickets.get(T * n_kv_heads)
        if tickets is None:  # a new buffer, zeroed before any recorded work can use it
            tickets = self._make_weight_buffer(np.zeros(T * n_kv_heads, np.uint32), const=True)
            self._attn_tickets[T * n_kv_heads] = tickets
        self._dispatch(
            self._pipeline(kernel, **defs, **types),
            [
                self._attn_params(shape, ns, t0, n),
                *inputs,
                self._bind(5, out),
                self._bind(6, part),
                self._bind_buffer(7, tickets),
            ],
            (ns, n_kv_heads, n),
        )

    def _attn2_defs(self, head_dim: int, gq: int, n_ctx: int, kv_dtype: str) -> dict:
        """attn_decode2's header: the largest power-of-two tile up to attn_chunk whose workgroup memory fits."""
        wg, nv = _ATTN2_WG, head_dim // 4
        e = gq * nv
        kv_bytes = 8 if kv_dtype == "f16" else 16  # one vec4
        tile = 1 << (min(self.attn_chunk, wg).bit_length() - 1)
        while True:
            ns = max(1, min(self.attn_splits, -(-n_ctx // tile)))
            shared = 16 * e + kv_bytes * tile * (2 * nv + 1) + 4 * gq * (tile + 4) + 16 * wg + 8 * ns * gq + 8
            if shared + 256 <= self.device.limits["max-compute-workgroup-storage-size"] or tile == 1:
                break
            tile //= 2
        hs = wg // tile
        return {
            "HD": head_dim,
            "NV": nv,
            "GQ": gq,
            "TILE": tile,
            "WG": wg,
            "NS": ns,
            "HS": hs,
            "SPT": -(-gq // hs),
            "E": e,
            "PE": -(-e // wg),
            "KG": max(1, wg // e),
            "LT": -(-tile * nv // wg),
        }

    def _attn3_defs(self, head_dim: int, gq: int, n_ctx: int, kv_dtype: str) -> dict:
        """attn_decode3's header. A key's dot product spans LPK lanes (attn3_lanes, else the power of two >= head_dim
        / 4, at most 32: one subgroup on GPUs), so R = 128 / LPK rows; a tile is attn_chunk keys (at least R, U =
        keys per row, at most _ATTN3_MAX_U). Merge passes of HB heads so workgroup memory fits."""
        wg, nv = _ATTN2_WG, head_dim // 4
        lpk = self.attn3_lanes or min(32, 1 << (nv - 1).bit_length())
        if lpk & (lpk - 1) or not 0 < lpk <= wg:
            raise ValueError(f"attn_decode3 lanes per key must be a power of two up to {wg} (got {lpk})")
        rows = wg // lpk
        u = max(1, min(_ATTN3_MAX_U, self.attn_chunk // rows))
        tile = rows * u
        ns = max(1, min(self.attn_splits, -(-n_ctx // tile)))
        p4 = -(-u * gq // 4)
        fb = min(p4, 2)
        e = gq * nv
        hb = gq
        limit = self.device.limits["max-compute-workgroup-storage-size"] - 256
        while hb > 1 and 16 * max(2 * fb * wg, 2 * wg, rows * hb * nv) + 8 * rows * gq + 16 > limit:
            hb -= 1
        return {
            "HD": head_dim,
            "NV": nv,
            "GQ": gq,
            "WG": wg,
            "LPK": lpk,
            "NC": -(-nv // lpk),
            "R": rows,
            "U": u,
            "TILE": tile,
            "NS": ns,
            "P4": p4,
            "FB": fb,
            "HB": hb,
            "NP": -(-gq // hb),
            "EB": hb * nv,
            "PEB": -(-hb * nv // wg),
            "E": e,
            "PE": -(-e // wg),
            "EW": min(e, wg),
            "KG": max(1, wg // e),
            "NW": max(2 * fb * wg, 2 * wg, rows * hb * nv),
        }

    def _elementwise(self, entry: str, dtype: str, n: int, a: Tensor, b: Tensor | None, out: Tensor, width=0) -> None:
        pipeline = self._pipeline("elementwise", entry=entry, act=dtype)
        bindings = [self._bind_params(n, width), self._bind(1, a), self._bind(3, out)]
        if b is not None:
            bindings.insert(2, self._bind(2, b))
        return pipeline, bindings

    def _do_swiglu(self, gate, up, out) -> None:
        self.require_op("swiglu", gate.dtype)
        pipeline, bindings = self._elementwise("swiglu", gate.dtype, gate.size, gate, up, out)
        self._dispatch(pipeline, bindings, _groups(-(-gate.size // 256)))

    def _do_add(self, a, b, out) -> None:
        self.require_op("add", a.dtype)
        pipeline, bindings = self._elementwise("add", a.dtype, a.size, a, b, out)
        self._dispatch(pipeline, bindings, _groups(-(-a.size // 256)))

    def _do_gather_rows(self, x, rows, out) -> None:
        self.require_op("gather_rows", x.dtype)
        width = x.size // x.shape[0]
        pipeline, bindings = self._elementwise("gather_rows", x.dtype, out.size, x, None, out, width)
        self._dispatch(pipeline, [*bindings, self._bind(4, rows)], _groups(-(-out.size // 256)))

    def _argmax_to(self, x: Tensor, out: Tensor, rows: int) -> None:
        """Record the argmax kernel: the index of the largest value of each of x's first `rows` rows into out[r]
        (a u32 or i32 tensor), one workgroup per row."""
        self.require_op("argmax", x.dtype)
        if len(x.shape) > 2 or out.size < rows:
            raise ValueError(f"argmax: x must be [R, N] and ids hold R values (got {x.shape} into {out.shape})")
        self._dispatch(
            self._pipeline("argmax", act=x.dtype, WG=self.argmax_wg),
            [self._bind_params(x.shape[-1]), self._bind(1, x), self._bind(2, out)],
            (rows, 1, 1),
        )

    def argmax(self, x: Tensor) -> int:
        result = self._internal(("argmax", 1), (1,), "u32")
        self._argmax_to(x, result, 1)
        return int(self.download(result)[0])

    def argmax_rows(self, x: Tensor) -> list[int]:
        R = x.shape[0]
        result = self._internal(("argmax", R), (R,), "u32")
        self._argmax_to(x, result, R)
        return [int(i) for i in self.download(result)]

    def argmax_into(self, x: Tensor, ids: Tensor) -> Any:
        """The argmax kernel writes each row's index straight into ids (the next step's input) and a copy goes to
        one of two small staging buffers, read by read_tokens: the next step is submitted before the host waits."""
        R = x.shape[0]
        self._argmax_to(x, ids, R)
        size = self.pool.bucket(4 * R)  # a pair per size: a handle of another size may still be unread
        pair = self._token_staging.get(size)
        if pair is None:
            pair = self._token_staging[size] = [self._map_buffer(size) for _ in range(2)]
        staging = pair[self._token_turn]
        self._token_turn ^= 1  # two in turn: the previous tokens may not have been read yet
        buf, offset, _ = ids.storage
        return staging, self._submit_copy(buf, offset, staging, 4 * R), R

    def read_tokens(self, handle: Any) -> list[int]:
        staging, index, R = handle
        if self._indexed:
            return self._indexed.read_words(staging, index, R)
        return [int(i) for i in self._read_mapped(staging, 4 * R).view(np.uint32)]

    # --- lifetime -----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Destroy every buffer this device made and drop its pipelines and bind groups."""
        if getattr(self, "device", None) is None:
            return
        self._end_pass()  # recorded but never submitted: discard
        self._pending = []
        for _, buf, _ in self._live.values():
            buf.destroy()
        self._live.clear()
        self._scratch.clear()
        self.pool.clear()
        for buf in list(self._weight_buffers.values()):
            buf.destroy()
        self._weight_buffers.clear()
        self.weight_bytes = self.const_bytes = 0
        for buf in self._uniforms.values():
            buf.destroy()
        self._uniforms.clear()
        if self._staging is not None:
            self._staging.destroy()
            self._staging = None
        for pair in self._token_staging.values():
            for buf in pair:
                buf.destroy()
        self._token_staging = {}
        self._rope_tables.clear()
        self._bind_groups.clear()
        self._forget_steps()
        self._pipelines.clear()
        self.device.destroy()
        self.device = self.queue = None
