"""Long runs on wgpu must not grow: 10,000 dispatches, a long greedy generation and 20 load/unload cycles leave
host RSS, the device's memory_stats() and wgpu's live object counts flat after warm-up.

KILN_SOAK_TOKENS sets the generation length (default 300, affordable on lavapipe; the issue's figure is 2000).
KILN_SOAK_MODEL=embedded soaks the embedded SmolLM2 instead of the tiny random model.
"""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from helpers import wgpu_device_or_skip

from kiln import gguf, quant
from kiln.model import Model
from kiln.session import solo

wgpu = pytest.importorskip("wgpu", reason="wgpu-py is not installed")
wgpu_backend = pytest.importorskip("kiln.runtime.wgpu_backend")

SOAK_TOKENS = int(os.environ.get("KILN_SOAK_TOKENS", "300"))
GROWTH = 0.05
FLAT_STATS = (
    "bytes_in_use",
    "bytes_pooled",
    "allocations",
    "weight_bytes",
    "const_bytes",
    "uniform_bytes",
    "pipelines",
    "bind_groups",
)


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def object_counts() -> dict[str, int]:
    counts = wgpu.diagnostics.object_counts.get_dict()
    return {name: entry["count"] for name, entry in counts.items() if name != "total"}


def assert_flat(before: dict, after: dict, what: str) -> None:
    grown = {k: (before[k], after[k]) for k in before if after[k] != before[k]}
    assert not grown, f"{what} changed after warm-up: {grown}"


def assert_rss_flat(before: int | None, after: int | None) -> None:
    if before is not None and after is not None:
        assert after <= before * (1 + GROWTH), f"host RSS grew {before >> 20} -> {after >> 20} MiB"


@pytest.fixture
def dev():
    device = wgpu_device_or_skip()
    yield device
    device.close()


def stats(dev) -> dict:
    s = dev.memory_stats()
    return {k: s[k] for k in FLAT_STATS}


def test_10000_dispatches_allocate_nothing(dev):
    rng = np.random.default_rng(0)
    d = 256
    x = dev.upload(rng.standard_normal((1, d), dtype=np.float32))
    h = dev.empty((1, d))
    w = dev.load_weight("w", Q.Q8_0, quant.random_weight(Q.Q8_0, d, d, rng), (d, d))
    norm = dev.load_weight("n", Q.F32, np.ones(d, np.float32).view(np.uint8), (d,))

    def round_of_ops(n: int) -> None:  # 4 dispatches per iteration, one readback per 50
        for i in range(n):
            dev.rms_norm(x, norm, 1e-5, h)
            dev.matmul(h, w, x)
            dev.swiglu(x, h, h)
            dev.add(x, h, x)
            if i % 50 == 49:
                dev.rms_norm(x, norm, 1e-5, x)  # keep values bounded
                assert np.isfinite(dev.download(x)).all()

    start = dev.dispatches
    round_of_ops(250)
    gc.collect()
    warm_stats, warm_objects, warm_rss = stats(dev), object_counts(), rss_bytes()
    round_of_ops(2250)
    gc.collect()
    assert dev.dispatches - start >= 10_000
    assert_flat(warm_stats, stats(dev), "memory_stats()")
    assert_flat(warm_objects, object_counts(), "wgpu object counts")
    assert_rss_flat(warm_rss, rss_bytes())


def generate_tokens(model: Model, n: int, prompt: list[int]) -> int:
    """Greedy tokens on the device; when the context is full, start again from the prompt. Returns a checksum."""
    dev, checksum, done = model.dev, 0, 0
    while done < n:
        solo(model).reset()
        token = dev.argmax(solo(model).prefill(prompt))
        while done < n and len(solo(model).tokens) < model.n_ctx:
            checksum = (checksum * 31 + token) % 1_000_003
            token = dev.argmax(solo(model).step([token]))
            done += 1
    return checksum


def test_long_generation_is_flat(dev, tiny_models, embedded_path):
    path = embedded_path if os.environ.get("KILN_SOAK_MODEL") == "embedded" else tiny_models(Q.Q4_K)
    model = Model(gguf.load(path), dev, n_ctx=2048)
    prompt = [1, 504, 3458, 314, 2899, 28]
    for _ in range(2):  # the second prompt re-allocates what the first decode step took over from the first's
        generate_tokens(model, 20, prompt)
    gc.collect()
    warm_stats, warm_objects, warm_rss = stats(dev), object_counts(), rss_bytes()
    generate_tokens(model, SOAK_TOKENS, prompt)
    gc.collect()
    assert_flat(warm_stats, stats(dev), "memory_stats()")
    assert_flat(warm_objects, object_counts(), "wgpu object counts")
    assert_rss_flat(warm_rss, rss_bytes())
    model.close()


def test_load_unload_20x_leaks_nothing(dev, tiny_models):
    file = gguf.load(tiny_models(Q.Q8_0))
    baseline = None
    for cycle in range(20):
        model = Model(file, dev, n_ctx=64)
        dev.argmax(solo(model).step([1, 2, 3]))
        dev.argmax(solo(model).step([4]))
        model.close()
        gc.collect()
        now = (stats(dev), object_counts(), rss_bytes())
        if cycle == 1:  # cycle 0 fills the pool and the pipeline cache
            baseline = now
        elif baseline is not None:
            assert now[0]["weight_bytes"] == 0 and now[0]["bytes_in_use"] == baseline[0]["bytes_in_use"]
            assert_flat(baseline[0], now[0], f"memory_stats() at cycle {cycle}")
            assert_flat(baseline[1], now[1], f"wgpu object counts at cycle {cycle}")
            assert_rss_flat(baseline[2], now[2])


def test_device_close_releases_every_object(tiny_models):
    """A whole device (model loaded, run, closed) leaves no wgpu object alive, three times over."""
    file = gguf.load(tiny_models(Q.Q8_0))
    gc.collect()
    before = object_counts()
    for _ in range(3):
        dev = wgpu_device_or_skip()
        model = Model(file, dev, n_ctx=32)
        dev.argmax(solo(model).prefill([1, 2, 3]))
        model.close()
        dev.close()
        del model, dev
        gc.collect()
        assert_flat(before, object_counts(), "wgpu object counts after close()")
