"""The batched engine on every available backend: a batch of mixed sequences (decode rows, prompt chunks, shared
prefix blocks) gives each sequence the logits it gets alone and the reference's; the scheduler's greedy output
equals the backend's own one-sequence greedy output, under preemption too; blocks and memory come back."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from helpers import cuda_device_or_skip, fresh_greedy, fresh_logits, nmse, wgpu_device_or_skip

from kiln import gguf, synth
from kiln.batch import Batch
from kiln.model import Model
from kiln.runtime.numpy_backend import NumpyDevice
from kiln.scheduler import Request, Scheduler

SHAPE = synth.Shape(2, 256, 4, 2, 512, vocab_size=512, context_length=1024)
BACKENDS = ("numpy", "wgpu", "cuda")
# Logits of the same sequence alone and inside a batch on one device (f16 KV on GPUs; kernels may pick other
# splits for other shapes), and against the f32 NumPy reference.
SAME_DEVICE, VS_REFERENCE = 1e-4, 5e-3


def _device(name: str):
    if name == "cuda":
        return cuda_device_or_skip()
    if name == "wgpu":
        return wgpu_device_or_skip()
    return NumpyDevice()


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("batched") / "tiny-long.gguf")
    return synth.write_model(p, SHAPE, Q.Q8_0, seed=11)


@pytest.fixture(scope="module")
def reference(path):
    m = Model(gguf.load(path), NumpyDevice(), n_ctx=1024)
    yield m
    m.close()


@pytest.fixture(scope="module", params=BACKENDS)
def model(request, path):
    dev = _device(request.param)
    m = Model(gguf.load(path), dev, n_ctx=1024)
    yield m
    m.close()
    dev.close()


def _prompts(seed: int, n: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    shared = rng.integers(0, 512, 37).tolist()
    out = []
    for i in range(n):
        p = rng.integers(0, 512, int(rng.choice([1, 3, 16, 17, 40, 130]))).tolist()
        out.append(shared + p if i % 2 else p)
    return out


def test_batch_logits_equal_solo_and_reference(model, reference):
    prompts = _prompts(0, 12)
    cache = model.make_cache(12 * 200)
    seqs, batch, rows = [], Batch(), []
    for i, p in enumerate(prompts):
        seq = cache.open(p)
        start = len(seq.tokens)
        if i % 3 == 0 and len(p) - start > 1:  # these run all but their last token first: a decode row below
            assert cache.reserve(seq, len(p) - 1)
            b = Batch()
            b.add(cache, seq, p[start:-1], start, want_logits=True)
            model.forward(b, cache)
            cache.commit(seq, p[start:-1])
            start = len(p) - 1
        assert cache.reserve(seq, len(p))
        rows.append(batch.add(cache, seq, p[start:], start, want_logits=True))
        seqs.append(seq)
    got = model.dev.download(model.forward(batch, cache))
    assert np.isfinite(got[: len(rows)]).all()
    for p, row in zip(prompts, rows):
        assert nmse(got[row], fresh_logits(model, p)) <= SAME_DEVICE
        assert nmse(got[row], fresh_logits(reference, p)) <= VS_REFERENCE
    for seq in seqs:
        cache.close_seq(seq)
    assert cache.blocks.in_use == 0
    cache.close()


def test_scheduler_greedy_equals_session_greedy_with_preemption(model):
    prompts = _prompts(1, 10)
    want = [fresh_greedy(model, p, 30) for p in prompts]
    cache = model.make_cache(16 * 13)  # too small for all ten at once: some are preempted and recomputed
    sched = Scheduler(model, cache, max_seqs=8, token_budget=96)
    reqs = [Request(p, 30) for p in prompts]
    for r in reqs:
        sched.add(r)
    for _ in range(2000):
        if not sched.busy:
            break
        sched.step()
    assert not sched.busy
    assert sched.preempted > 0
    assert [r.output for r in reqs] == want
    assert cache.blocks.in_use == 0
    cache.close()
