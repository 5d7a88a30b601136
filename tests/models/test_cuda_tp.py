"""Tensor parallelism over 2 GPUs through NCCL against one GPU: greedy tokens for 32 tokens and the last logits, with
the decode step (NCCL all-reduces included, in NCCL's symmetric window) captured in CUDA graphs, and with graphs and
the window off; every rank ends with the same logits; the residual adds are folded into the all-reduces and a
repeated prefill replays its graph; api.load(tensor_parallel=2) drives generate. The model is a random
TinyLlama shape cut to 4 layers (32 heads, 4 KV heads: 16 and 2 per rank); the embedded SmolLM2's 9 heads do not
split in two. Skipped cleanly without CuPy, NCCL or a second GPU."""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
import time

import numpy as np
import pytest

pytest.importorskip("cupy")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from helpers import nmse  # noqa: E402

from kiln import api, gguf, synth  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.generate import generate  # noqa: E402
from kiln.model import Model  # noqa: E402
from kiln.session import solo

N_GREEDY = 32
N_CTX = 256
PROMPT = [int(i) for i in np.random.default_rng(7).integers(300, 32000, 24)]


@pytest.fixture(scope="module")
def gpus() -> int:
    try:
        from kiln.runtime.cuda_backend import cupy
        from kiln.tp import _import_nccl

        count = cupy.cuda.runtime.getDeviceCount()
    except (KilnError, ImportError, Exception) as e:
        pytest.skip(f"no CUDA device: {e}")
    if count < 2:
        pytest.skip(f"tensor parallelism needs 2 GPUs, found {count}")
    try:
        _import_nccl()
    except KilnError as e:
        pytest.skip(str(e))
    return count


@pytest.fixture(scope="module")
def path(gpus, tmp_path_factory) -> str:
    shape = dataclasses.replace(synth.SHAPES["tinyllama-1.1b"], n_layers=4, context_length=1024)
    out = str(tmp_path_factory.mktemp("tp") / "tinyllama-4l-q8_0.gguf")
    with pytest.MonkeyPatch.context() as mp:
        try:
            if not os.path.exists(api.default_model_path()):
                raise KilnError("no embedded model")
        except KilnError:
            mp.setattr(synth, "_tokenizer_fields", synth._byte_tokenizer_fields)  # as bench/make_models.py
        return synth.write_model(out, shape, Q.Q8_0, embed_type=Q.Q8_0, tied=True, seed=3)


def greedy(model, ids: list[int], n: int) -> tuple[list[int], np.ndarray, float]:
    """Greedy tokens, the last logits, and decode tokens/s."""
    solo(model).reset()
    logits = solo(model).prefill(ids)
    out = [model.dev.argmax(logits)]
    t0 = time.perf_counter()
    for _ in range(n - 1):
        logits = solo(model).step([out[-1]])
        out.append(model.dev.argmax(logits))
    tps = (n - 1) / (time.perf_counter() - t0)
    return out, model.dev.download(solo(model).step([out[-1]]))[0], tps


@pytest.fixture(scope="module")
def one_gpu(path):
    from kiln.runtime.cuda_backend import CudaDevice

    dev = CudaDevice(0)
    model = Model(gguf.load(path), dev, n_ctx=N_CTX)
    try:
        greedy(model, PROMPT, 4)  # warm-up: kernels compiled, graphs captured
        tokens, logits, tps = greedy(model, PROMPT, N_GREEDY)
    finally:
        model.close()
        dev.close()
    print(f"\n[1 GPU: decode {tps:.0f} tok/s]")
    return tokens, logits


def _all_reduce_in_graphs(dev) -> bool:
    return any(name == "all_reduce" for key, plan in dev._plans.items() if key in dev._graphs for name, _ in plan)


def _prefill_in_graphs(dev) -> bool:
    return any(key not in dev._plans for key in dev._graphs)  # _plans holds the decode graphs' plans only


def test_tp2_greedy_matches_one_gpu(path, one_gpu):
    from kiln.tp import TensorParallelModel

    tp = TensorParallelModel(path, 2, n_ctx=N_CTX)
    try:
        runs = [greedy(tp, PROMPT, N_GREEDY) for _ in range(3)]  # the 2nd captures the prefill, the 3rd replays it
        for tokens, logits, _ in runs:
            assert tokens == one_gpu[0]
            assert nmse(logits, one_gpu[1]) < 1e-5
        assert all(_all_reduce_in_graphs(d) for d in tp.devices)  # NCCL went into the decode graphs
        layers = tp.cfg.n_layers
        for r, d in enumerate(tp.devices):  # the residual fold: rank 0 adds x into its GEMV, the others no add
            for plan in d._plans.values():
                names = [name for name, _ in plan]
                assert names.count("all_reduce") == 2 * layers
                assert names.count("add") + names.count("gemv_res") == (2 * layers if r == 0 else 0)
            assert _prefill_in_graphs(d)  # the 3rd prefill replayed its CUDA graph, NCCL inside
        if tp._group.windows is not None:  # NCCL >= 2.27: the all-reduced tensors live in its symmetric window
            assert all(d._wpool.in_use > 0 for d in tp.devices)
            assert all(d.memory_stats()["window_bytes"] > 0 for d in tp.devices)
        decode_logits = lambda r: tp.models[r].acts(1, 1, 1, tp.sessions[r].cache.table_width).logits  # noqa: E731
        ranks = tp._all(lambda r: tp.devices[r].download(decode_logits(r)))
        assert np.array_equal(ranks[0], ranks[1])  # every rank sums to the same bits
        # generate's path: each rank feeds its own argmax to its next step on its GPU
        tokens = list(itertools.islice(tp.greedy(tp.prefill(PROMPT)), N_GREEDY))
        assert tokens == one_gpu[0]
        print(f"\n[2 GPUs, graphs: decode {runs[-1][2]:.0f} tok/s]")
    finally:
        tp.close()


def test_tp2_eager_matches_one_gpu(path, one_gpu, monkeypatch):
    from kiln.tp import TensorParallelModel

    monkeypatch.setenv("KILN_CUDA_GRAPHS", "0")
    monkeypatch.setenv("KILN_TP_WINDOW", "0")  # and NCCL's usual all-reduce path
    tp = TensorParallelModel(path, 2, n_ctx=N_CTX)
    try:
        assert tp._group.windows is None and not any(d._wpool for d in tp.devices)
        greedy(tp, PROMPT, 4)
        tokens, logits, tps = greedy(tp, PROMPT, N_GREEDY)
        assert tokens == one_gpu[0]
        assert nmse(logits, one_gpu[1]) < 1e-5
        assert not any(d._graphs for d in tp.devices)
        print(f"\n[2 GPUs, no graphs: decode {tps:.0f} tok/s]")
    finally:
        tp.close()


def test_api_load_generates_and_closes(path, one_gpu):
    model = api.load(path, backend="cuda", n_ctx=N_CTX, tensor_parallel=2)
    try:
        assert "tensor parallel x2" in model.dev.name and model.dev.memory_stats()["ranks"] == 2
        assert isinstance(generate(model, model.tokenizer, PROMPT, max_tokens=8), str)
        assert solo(model).tokens[: len(PROMPT)] == PROMPT
    finally:
        model.close()
    model.dev.close()  # what kiln bench does after model.close(): a no-op now
    assert not any(t.name.startswith("kiln-tp-rank") for t in threading.enumerate())
