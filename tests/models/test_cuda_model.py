"""Whole models on CUDA against the NumPy reference: the embedded SmolLM2's greedy tokens for 32 tokens on three
prompts, logits of tiny random models of every format (through the fused, graph-captured decode path), chunked
prefill, two models on one device, and a long decode soak with flat device memory (KILN_SOAK_TOKENS, default 2000).
Skipped cleanly without CuPy or a GPU."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

pytest.importorskip("cupy")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from helpers import cuda_device_or_skip, greedy, nmse  # noqa: E402

from kiln import api, gguf, synth  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.model import Model  # noqa: E402
from kiln.runtime.numpy_backend import NumpyDevice  # noqa: E402
from kiln.session import solo

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]
N_GREEDY = 32


@pytest.fixture(scope="module")
def cuda():
    dev = cuda_device_or_skip()
    yield dev
    dev.close()


def test_embedded_greedy_tokens_match_numpy(cuda, embedded_path):
    path = embedded_path
    f = gguf.load(path)
    models = {"cuda": Model(f, cuda, n_ctx=256), "numpy": Model(f, NumpyDevice(), n_ctx=256)}
    tok = api.load(path, backend="numpy").tokenizer
    try:
        for prompt in PROMPTS:
            ids = tok.encode(prompt)
            (tc, lc), (tn, ln) = (greedy(models[b], ids, N_GREEDY) for b in ("cuda", "numpy"))
            assert tc == tn, f"{prompt!r}: cuda {tok.decode(tc)!r} != numpy {tok.decode(tn)!r}"
            assert nmse(lc, ln) <= 1e-3
    finally:
        models["cuda"].close()


@pytest.mark.parametrize(
    "qtype,arch",
    [
        (Q.Q8_0, "llama"),
        (Q.Q4_0, "qwen2"),
        (Q.Q4_1, "llama"),
        (Q.Q5_0, "llama"),
        (Q.Q5_1, "qwen2"),
        (Q.Q4_K, "llama"),
        (Q.Q5_K, "qwen2"),
        (Q.Q6_K, "llama"),
        (Q.F16, "llama"),
        (Q.BF16, "llama"),
        (Q.F32, "qwen2"),
    ],
)
def test_tiny_model_logits_match_numpy(cuda, tiny_models, qtype, arch):
    """Teacher-forced: the same 20-token prompt and 12 decode tokens on both; logits after every step."""
    f = gguf.load(tiny_models(qtype, arch))
    ids = np.random.default_rng(int(qtype)).integers(0, f.config.vocab_size, 32).tolist()
    mc = Model(f, cuda, n_ctx=64)
    try:
        assert _worst_teacher_forced_nmse(mc, Model(f, NumpyDevice(), n_ctx=64), ids, 20) <= 1e-3
        assert len(cuda._graphs) >= 1  # decode went through a captured graph
    finally:
        mc.close()


def _worst_teacher_forced_nmse(mc: Model, mn: Model, ids: list[int], n_prompt: int) -> float:
    """Prefill ids[:n_prompt] on both models, then step through the rest; the worst logits NMSE of any step."""
    worst = 0.0
    lc, ln = solo(mc).prefill(ids[:n_prompt]), solo(mn).prefill(ids[:n_prompt])
    for t in ids[n_prompt:]:
        worst = max(worst, nmse(mc.dev.download(lc), mn.dev.download(ln)))
        lc, ln = solo(mc).step([t]), solo(mn).step([t])
    return worst


# Rows wide enough for the block GEMV kernel (gemv.cu BK 1): d 1024 (64 Q8_0 chunks) and d_ff 11008 (two chunks per
# thread for Q8_0), with GQA and NeoX pairs coming from qwen2.
WIDE = synth.Shape(2, 1024, 8, 2, 11008, vocab_size=512, context_length=128)


@pytest.mark.parametrize("qtype,arch", [(Q.Q8_0, "llama"), (Q.Q4_0, "qwen2"), (Q.Q6_K, "llama"), (Q.F16, "qwen2")])
def test_wide_model_logits_match_numpy(cuda, tmp_path, qtype, arch):
    """Teacher-forced logits of a 2-layer model of real widths, through the fused decode graph, against numpy."""
    path = synth.write_model(str(tmp_path / "wide.gguf"), WIDE, qtype, arch=arch, seed=3)
    f = gguf.load(path)
    ids = np.random.default_rng(1).integers(0, f.config.vocab_size, 24).tolist()
    mc = Model(f, cuda, n_ctx=64)
    try:
        # As for the tiny models: f16 KV cache and f16 prefill GEMMs on CUDA.
        assert _worst_teacher_forced_nmse(mc, Model(f, NumpyDevice(), n_ctx=64), ids, 16) <= 1e-3
    finally:
        mc.close()


def test_chunked_prefill_equals_one_pass(cuda, tiny_models):
    f = gguf.load(tiny_models(Q.Q4_K))
    ids = np.random.default_rng(5).integers(0, f.config.vocab_size, 45).tolist()
    m = Model(f, cuda, n_ctx=64)
    try:
        one = cuda.download(solo(m).prefill(ids))
        solo(m).reset()
        chunked = cuda.download(solo(m).prefill(ids, chunk=16))
        assert nmse(chunked, one) < 1e-6
    finally:
        m.close()


def test_repeated_prefill_becomes_a_graph(cuda, tiny_models):
    """A prefill size seen twice is captured, cuBLAS GEMMs included (kiln's own handle), and the graph's logits equal
    the eager run's."""
    f = gguf.load(tiny_models(Q.Q8_0))
    ids = np.random.default_rng(6).integers(0, f.config.vocab_size, 24).tolist()
    m = Model(f, cuda, n_ctx=64)
    try:
        eager = cuda.download(solo(m).prefill(ids))
        graphs = len(cuda._graphs)
        for _ in range(2):  # the second sight of this size captures; the third replays the graph
            solo(m).reset()
            logits = cuda.download(solo(m).prefill(ids))
            assert nmse(logits, eager) < 1e-10
        assert len(cuda._graphs) == graphs + 1
        assert not any(k[0] == (m.uid, "forward", len(ids)) for k in cuda._eager_keys)
    finally:
        m.close()


def test_prefill_graphs_do_not_pile_up(cuda, tiny_models):
    """Prompts of many lengths, each seen twice: a model keeps the last two prompt shapes' activations (padded to
    buckets), and freeing the others drops their graphs, so at most two prefill graphs live at a time."""
    f = gguf.load(tiny_models(Q.Q8_0))
    m = Model(f, cuda, n_ctx=64)
    try:
        before = len(cuda._graphs)
        for n in range(5, 16):
            for _ in range(2):
                solo(m).reset()
                solo(m).prefill(list(range(1, n + 1)))
        assert before + 1 <= len(cuda._graphs) <= before + 2
    finally:
        m.close()


def test_two_models_share_a_device(cuda, tiny_models):
    """Each model replays its own graph (graphs are keyed by the model and its activations, not just the step)."""
    fa, fb = gguf.load(tiny_models(Q.Q8_0)), gguf.load(tiny_models(Q.Q4_K))
    ids = [5, 9, 200, 7]
    alone = []
    for f in (fa, fb):
        m = Model(f, cuda, n_ctx=32)
        alone.append(greedy(m, ids, 6)[0])
        m.close()
    ma, mb = Model(fa, cuda, n_ctx=32), Model(fb, cuda, n_ctx=32)
    try:
        la, lb = solo(ma).prefill(ids), solo(mb).prefill(ids)
        got = ([], [])
        for _ in range(6):
            got[0].append(cuda.argmax(la))
            got[1].append(cuda.argmax(lb))
            la, lb = solo(ma).step([got[0][-1]]), solo(mb).step([got[1][-1]])
        assert list(got) == alone
    finally:
        ma.close()
        mb.close()


def _soak_path(tmp_path_factory) -> str:
    try:
        path = api.default_model_path()
        if os.path.exists(path):
            return path
    except KilnError:
        pass
    path = str(tmp_path_factory.mktemp("soak") / "long.gguf")  # a tiny model with a long context
    return synth.write_model(path, synth.Shape(2, 256, 4, 2, 512, vocab_size=512, context_length=4096), Q.Q4_1)


def test_soak_memory_flat(cuda, tmp_path_factory):
    import cupy

    n = int(os.environ.get("KILN_SOAK_TOKENS", "2000"))
    f = gguf.load(_soak_path(tmp_path_factory))
    m = Model(f, cuda, n_ctx=min(f.config.context_length, n + 64))
    try:
        logits = solo(m).prefill(list(range(10, 26)))
        token, marks = 0, {}
        t0 = time.perf_counter()
        for i in range(n):
            token = cuda.argmax(logits)
            assert 0 <= token < f.config.vocab_size
            logits = solo(m).step([token])
            if i in (50, n - 1):
                cuda.sync()
                marks[i] = (cuda.memory_stats(), cupy.cuda.runtime.memGetInfo()[0])
        rate = n / (time.perf_counter() - t0)
        (s0, free0), (s1, free1) = marks[50], marks[n - 1]
        for key in ("bytes_in_use", "allocations", "device_pool_bytes", "graphs", "scratch_bytes"):
            assert s1[key] == s0[key], f"{key} grew from {s0[key]} to {s1[key]} over {n} tokens"
        assert abs(free1 - free0) < (1 << 20), f"free device memory moved by {free0 - free1} bytes"
        print(f"soak: {n} tokens at {rate:.0f} tok/s, {s1['bytes_in_use'] / 2**20:.1f} MiB in use")
    finally:
        m.close()
