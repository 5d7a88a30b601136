"""The batched engine on the NumPy reference: batch invariance, the paged KV cache and its prefix cache, the
scheduler under load (disconnects, preemption), on a tiny random model with a long context."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from helpers import fresh_greedy, fresh_logits, nmse

from kiln import gguf, synth
from kiln.batch import Batch
from kiln.kv_cache import BlockManager
from kiln.model import Model
from kiln.runtime.numpy_backend import NumpyDevice
from kiln.scheduler import Request, Scheduler

SHAPE = synth.Shape(2, 256, 4, 2, 512, vocab_size=512, context_length=1024)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("engine") / "tiny-long.gguf")
    synth.write_model(path, SHAPE, Q.Q8_0, seed=7)
    m = Model(gguf.load(path), NumpyDevice(), n_ctx=1024)
    yield m
    m.close()


def test_batch_invariance_mixed_lengths_and_shared_prefixes(model):
    """Each sequence's logits inside one batch of mixed lengths (decode rows, prompt chunks, shared prefix blocks)
    equal its solo logits."""
    rng = np.random.default_rng(0)
    cache = model.make_cache(64 * 700)
    shared = rng.integers(0, 512, 40).tolist()  # two full blocks and a half every third sequence starts with
    prompts = []
    for i in range(40):
        n = int(rng.choice([1, 2, 15, 16, 17, 33, 100, 250, 600]))
        p = rng.integers(0, 512, n).tolist()
        prompts.append(shared + p if i % 3 == 0 else p)
    # First pass: every prompt but its last few tokens, so the batch below mixes decode rows and chunks.
    seqs, held = [], []
    for p in prompts:
        keep = len(p) - (1 if len(p) % 2 else min(len(p), 7))
        seq = cache.open(p)
        held.append(max(keep, len(seq.tokens)))
        if held[-1] > len(seq.tokens):
            assert cache.reserve(seq, held[-1])
            b = Batch()
            b.add(cache, seq, p[len(seq.tokens) : held[-1]], len(seq.tokens), want_logits=True)
            model.forward(b, cache)
            cache.commit(seq, p[len(seq.tokens) : held[-1]])
        seqs.append(seq)
    assert cache.blocks.hits > 0  # the shared prefix was found, not recomputed
    batch, rows = Batch(), []
    for p, seq, k in zip(prompts, seqs, held):
        assert cache.reserve(seq, len(p))
        rows.append(batch.add(cache, seq, p[k:], k, want_logits=True))
    assert not batch.decode and any(n == 1 for _, n, _ in batch.runs)
    got = model.dev.download(model.forward(batch, cache))
    for p, row in zip(prompts, rows):
        assert nmse(got[row], fresh_logits(model, p)) <= 1e-6
    for seq in seqs:
        cache.close_seq(seq)
    assert cache.blocks.in_use == 0
    cache.close()


def _drain(sched: Scheduler, limit: int = 100000) -> None:
    for _ in range(limit):
        if not sched.busy:
            return
        sched.step()
    raise AssertionError("the scheduler did not finish")


def test_scheduler_output_equals_solo_greedy_under_preemption(model):
    """A pool far too small for all requests at once: sequences are preempted and recomputed, and every request
    still produces exactly its solo greedy tokens; all blocks come back."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 512, int(n)).tolist() for n in rng.integers(1, 60, 12)]
    want = [fresh_greedy(model, p, 20) for p in prompts]
    cache = model.make_cache(16 * 14)  # 14 blocks: a few sequences at a time
    sched = Scheduler(model, cache, max_seqs=8, token_budget=64)
    reqs = [Request(p, 20) for p in prompts]
    for r in reqs:
        sched.add(r)
    _drain(sched)
    assert sched.preempted > 0
    assert [r.output for r in reqs] == want
    assert all(r.finish == "length" for r in reqs)
    assert cache.blocks.in_use == 0
    cache.close()


def test_many_requests_with_random_cancels_free_every_block(model):
    """1,000 requests of random lengths, some cancelled at random moments: every block returns, memory stays
    flat after warm-up."""
    rng = np.random.default_rng(2)
    cache = model.make_cache(16 * 80)
    sched = Scheduler(model, cache, max_seqs=32, token_budget=128)
    reqs = []
    for _i in range(1000):
        p = rng.integers(0, 512, int(rng.integers(1, 40))).tolist()
        reqs.append(Request(p, int(rng.integers(1, 6)), stop_ids=frozenset({3})))
        sched.add(reqs[-1])
    alloc = None
    steps = 0
    while sched.busy:
        sched.step()
        steps += 1
        if sched.running and rng.random() < 0.5:  # a client gone mid-generation (or mid-prefill)
            sched.cancel(sched.running[int(rng.integers(len(sched.running)))])
        if sched.waiting and rng.random() < 0.3:  # one gone before it was admitted
            sched.cancel(sched.waiting[int(rng.integers(len(sched.waiting)))])
        if steps == 50:
            alloc = model.dev.memory_stats()["allocations"]
    assert all(r.finish in ("stop", "length", "cancelled") for r in reqs)
    assert sum(r.finish == "cancelled" for r in reqs) > 100
    assert cache.blocks.in_use == 0
    assert model.dev.memory_stats()["allocations"] - alloc < 64  # activation sets of new shapes only
    cache.close()


def test_prefix_cache_skips_the_shared_prefill(model):
    """A second request with the same 500-token prefix prefills only the rest and gives the same output."""
    rng = np.random.default_rng(3)
    prefix = rng.integers(0, 512, 500).tolist()
    cache = model.make_cache(4096)
    sched = Scheduler(model, cache, max_seqs=4, token_budget=512)
    a = Request(prefix + [5, 6, 7], 8)
    sched.add(a)
    _drain(sched)
    b = Request(prefix + [9, 10], 8)
    sched.add(b)
    _drain(sched)
    assert a.prompt_cached == 0 and b.prompt_cached == 496  # 31 full blocks of 16
    assert b.output == fresh_greedy(model, prefix + [9, 10], 8)
    again = Request(prefix + [5, 6, 7], 8)
    sched.add(again)
    _drain(sched)
    assert again.output == a.output
    cache.close()


def test_siblings_wait_for_the_first_choice_and_share_its_blocks(model):
    cache = model.make_cache(4096)
    sched = Scheduler(model, cache, max_seqs=4)
    prompt = list(range(1, 90))
    first = Request(prompt, 5)
    others = [Request(prompt, 5, after=first) for _ in range(2)]
    for r in (first, *others):
        sched.add(r)
    _drain(sched)
    assert [r.prompt_cached for r in others] == [80, 80]
    assert first.output == others[0].output == others[1].output == fresh_greedy(model, prompt, 5)
    cache.close()


def test_block_manager_lru_eviction_and_refcounts():
    bm = BlockManager(4, 16)
    a, b, c = bm.take(), bm.take(), bm.take()
    assert sorted((a, b, c)) == [1, 2, 3] and bm.available == 0
    bm.remember(a, 11, 0, (1,))
    bm.remember(b, 22, 0, (2,))
    bm.release(a)
    bm.release(b)
    assert bm.available == 2 and bm.in_use == 1
    assert bm.find(22, 0, (2,)) == b  # held again: no longer evictable
    assert bm.find(22, 0, (3,)) is None  # same key, other tokens: a collision is a miss
    assert bm.take() == a  # the idle cached block is evicted on demand
    assert bm.find(11, 0, (1,)) is None
    with pytest.raises(MemoryError):
        bm.take()
