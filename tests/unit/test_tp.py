"""TensorParallelModel's rank threads on the CPU (NumPy devices, barrier all-reduce): the same greedy tokens and logits
as one Model, generate/bench-compatible interface, inputs rejected before any rank starts, a failing rank poisons the
model cleanly, and --tensor-parallel reaches api.load from every command. The NCCL path: tests/models/test_cuda_tp.py.
"""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from helpers import greedy

from kiln import api, bench, cli, gguf
from kiln import tp as tp_mod
from kiln.errors import ContextOverflow, KilnError
from kiln.generate import generate
from kiln.model import Model
from kiln.runtime.fusion import Fuser
from kiln.runtime.numpy_backend import NumpyDevice
from kiln.shard import ShardError
from kiln.tokenizer import Tokenizer
from kiln.tp import TensorParallelError, TensorParallelModel, TPDevice

PROMPT = [1, 504, 345, 314, 289, 28, 17, 42, 400, 7]
N_GREEDY = 12


@pytest.fixture(scope="module")
def path(tiny_models) -> str:
    return tiny_models(Q.Q8_0)


@pytest.fixture(scope="module")
def reference(path):
    dev = NumpyDevice()
    model = Model(gguf.load(path), dev, n_ctx=64)
    try:
        return greedy(model, PROMPT, N_GREEDY)
    finally:
        model.close()


@pytest.fixture
def tp(path):
    model = TensorParallelModel(path, 2, n_ctx=64, backend="numpy")
    yield model
    model.close()


def test_greedy_tokens_and_logits_match_one_model(tp, reference):
    tokens, logits = greedy(tp, PROMPT, N_GREEDY)
    assert tokens == reference[0]
    np.testing.assert_allclose(logits, reference[1], rtol=1e-4, atol=1e-4)
    again, _ = greedy(tp, PROMPT, N_GREEDY)  # reset and reuse: the ranks' caches start over together
    assert again == tokens
    assert [len(s.tokens) for s in tp.sessions] == [len(PROMPT) + N_GREEDY] * 2


def test_rank_threads_and_interface(tp, path):
    assert tp.models[0].cfg.n_heads == tp.cfg.n_heads // 2 and tp.cfg == gguf.load(path).config
    threads = {t.name for t in threading.enumerate()}
    assert "kiln-tp-rank1" in threads and "kiln-tp-rank0" not in threads  # rank 0 runs on the caller's thread
    assert isinstance(tp.dev, TPDevice) and tp.dev.backend == "numpy" and "tensor parallel x2" in tp.dev.name
    stats = tp.dev.memory_stats()
    assert stats["ranks"] == 2 and stats["max_rank_peak_bytes"] <= stats["peak_bytes"]
    tp.tokenizer = Tokenizer.from_gguf_fields(tp.gguf.tokenizer_fields())
    assert isinstance(generate(tp, tp.tokenizer, PROMPT, max_tokens=5), str)
    assert tp.n_ctx == 64 and len(tp.tokens) > len(PROMPT)


@pytest.mark.parametrize("fold", ["1", "0"])
def test_residual_fold_drops_the_adds_and_keeps_the_tokens(path, reference, monkeypatch, fold):
    """fold_residual on the recorded steps (the same rewrite the cuda ranks run): rank 0 keeps matmul + add before
    an all-reduce of x, which the fusion pass turns into one GEMV; rank 1 writes into x and has no add at all."""
    monkeypatch.setenv("KILN_TP_FOLD", fold)
    seen: dict[int, tuple[list, list, list]] = {}  # rank -> op names: recorded, folded, folded and fused
    real = tp_mod.fold_residual
    names = lambda ops: [n for n, _ in ops]  # noqa: E731

    def spy(ops, rank, tid):
        out = real(ops, rank, tid)
        seen[rank] = (names(ops), names(out), names(Fuser(tid, lambda *a: True).fuse(out)))
        return out

    monkeypatch.setattr(tp_mod, "fold_residual", spy)
    model = TensorParallelModel(path, 2, n_ctx=64, backend="numpy")
    try:
        tokens, logits = greedy(model, PROMPT, N_GREEDY)
    finally:
        model.close()
    assert tokens == reference[0]
    np.testing.assert_allclose(logits, reference[1], rtol=1e-4, atol=1e-4)
    if fold == "0":
        assert not seen
        return
    layers = model.cfg.n_layers
    assert sorted(seen) == [0, 1]
    for rank, (ops, out, fused) in seen.items():
        assert ops.count("add") == ops.count("all_reduce") == 2 * layers
        assert out.count("all_reduce") == 2 * layers
        assert out.count("add") == (2 * layers if rank == 0 else 0)
        assert "add" not in fused and fused.count("gemv_res") == (2 * layers if rank == 0 else 0)


def test_device_side_greedy_matches_one_model(tp, reference):
    """TensorParallelModel.greedy: each rank feeds its own argmax to its next step on its device (what generate and
    kiln bench use); the tokens are the single model's, and the ranks' caches stay together."""
    tokens = list(itertools.islice(tp.greedy(tp.prefill(PROMPT)), N_GREEDY))
    assert tokens == reference[0]
    assert len({len(s.tokens) for s in tp.sessions}) == 1
    assert greedy(tp, PROMPT, 3)[0] == reference[0][:3]  # usable afterwards, host loop included
    other = tp.dev.empty((1, tp.cfg.vocab_size))
    with pytest.raises(KilnError, match="last prefill"):
        next(tp.greedy(other))
    tp.dev.free(other)


def test_ranks_whose_tokens_differ_stop_greedy(tp):
    real = tp.devices[1].read_tokens
    tp.devices[1].read_tokens = lambda handle: [t + 1 for t in real(handle)]
    gen = tp.greedy(tp.prefill(PROMPT))
    with pytest.raises(TensorParallelError, match="differ"):
        next(gen)
    with pytest.raises(TensorParallelError, match="differ"):
        tp.step([5])


def test_fold_leaves_other_patterns_alone():
    """No fold when h is read after the add, when the matmul has a bias, or when the add is not the residual."""
    dev = NumpyDevice()
    a, h, x, y = (dev.empty((1, 8)) for _ in range(4))
    w = object()
    tid = tp_mod._host_tid
    base = [("matmul", (a, w, h, None)), ("all_reduce", (h,)), ("add", (x, h, x))]
    assert [n for n, _ in tp_mod.fold_residual(base, 1, tid)] == ["matmul", "all_reduce"]
    for ops in (
        base + [("add", (y, h, y))],  # h read afterwards
        [("matmul", (a, w, h, object())), *base[1:]],  # bias
        [*base[:2], ("add", (x, h, y))],  # result not in the residual
        [("matmul", (x, w, h, None)), *base[1:]],  # the matmul reads x
    ):
        assert tp_mod.fold_residual(ops, 1, tid) == ops


def test_prefix_reuse_is_the_same_on_every_rank(tp, reference):
    tp.prefill(PROMPT + reference[0][:3])
    logits = tp.prefill(PROMPT + reference[0][:5])  # reuses the cached prefix, runs only the new tokens
    assert tp.dev.argmax(logits) == reference[0][5]


def test_bad_inputs_leave_the_model_usable(tp, reference):
    with pytest.raises(ValueError):
        tp.prefill([])
    with pytest.raises(ContextOverflow):
        tp.prefill(list(range(65)))
    tp.prefill(PROMPT)
    with pytest.raises(ContextOverflow):
        tp.step(list(range(60)))
    assert greedy(tp, PROMPT, 3)[0] == reference[0][:3]


def test_a_failing_rank_poisons_the_model(tp):
    tp.prefill(PROMPT)

    def boom(ids):
        raise RuntimeError("rank 1 went away")

    tp.sessions[1].step = boom
    with pytest.raises(RuntimeError, match="went away"):  # the cause, not rank 0's broken barrier
        tp.step([5])
    with pytest.raises(TensorParallelError, match="rank 1"):
        tp.step([5])
    tp.close()
    tp.close()  # idempotent
    assert not any(t.name.startswith("kiln-tp-rank") for t in threading.enumerate())
    with pytest.raises(KilnError, match="closed"):
        tp.step([5])


def test_unsplittable_model_fails_before_loading(path):
    with pytest.raises(ShardError, match="heads"):
        TensorParallelModel(path, 3, backend="numpy")  # 4 heads
    with pytest.raises(KilnError, match="at least 1"):
        TensorParallelModel(path, 0, backend="numpy")


def test_api_load_needs_cuda(path, monkeypatch):
    monkeypatch.delenv("KILN_BACKEND", raising=False)
    with pytest.raises(KilnError, match="cuda backend"):
        api.load(path, backend="numpy", tensor_parallel=2)
    with pytest.raises(KilnError, match="cuda backend"):
        bench.run_bench(path, "wgpu", tensor_parallel=2)
    with pytest.raises(KilnError, match="at least 1"):
        api.load(path, backend="cuda", tensor_parallel=0)
    model = api.load(path, backend="numpy", tensor_parallel=1)  # 1 is the plain Model
    assert isinstance(model, Model)
    model.close()


@pytest.mark.parametrize("argv", [["run", "hi"], ["chat"], ["bench"], ["serve"]])
def test_every_command_takes_tensor_parallel(argv):
    args = cli.build_parser().parse_args([*argv, "--tensor-parallel", "2"])
    assert args.tensor_parallel == 2
    assert cli.build_parser().parse_args(argv).tensor_parallel == 1


def test_cli_reports_a_non_cuda_backend_in_one_line(path, capsys):
    assert cli.main(["run", "hi", "-m", path, "-b", "numpy", "--tensor-parallel", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cuda backend" in err[0]


def _stand_in_cuda():
    """What the NCCL rank device takes of CudaDevice, on the CPU: replay() records a step through OpRecorder, runs
    it, then keeps it as the key's "graph" (a decode capture fails when told to); ops run as _do_<name>."""
    from types import SimpleNamespace

    from kiln.runtime.fusion import OpRecorder

    class StandIn(OpRecorder, NumpyDevice):
        def __init__(self, index: int):
            super().__init__()
            self.index, self.stream, self.graphs, self.fail_decode_capture = index, SimpleNamespace(ptr=0), {}, False

        def _run_op(self, name: str, args: tuple) -> None:
            if name == "all_reduce":
                self._do_all_reduce(*args)
            else:
                getattr(NumpyDevice, name)(self, *args)

        def replay(self, key, step) -> None:
            if key in self.graphs:
                for name, args in self.graphs[key]:
                    self._run_op(name, args)
                return
            self._rec = []
            try:
                step()
            finally:
                ops, self._rec = self._rec, None
            for name, args in ops:
                self._run_op(name, args)
            if self.fail_decode_capture and all(a[5].decode for n, a in ops if n == "attention"):
                raise RuntimeError("capturing NCCL calls is unsupported")
            self.graphs[key] = ops

    return StandIn


def test_nccl_device_schedule_without_a_gpu(path, reference, capsys):
    """The NCCL rank device over a CPU stand-in for CudaDevice (one rank, so NCCL's sum is the identity): the fold
    reaches what the backend records, every all-reduce goes to NCCL with its size, a decode step whose capture
    fails runs eagerly from then on (said once), and the skip-all-reduce diagnostic sends nothing."""
    from types import SimpleNamespace

    from kiln.session import Session

    cls = tp_mod._make_nccl_device_class(_stand_in_cuda(), {"f32": 7, "f16": 6}, 0)
    cls.tid = staticmethod(tp_mod._host_tid)  # NumPy storage: no CuPy pointer
    layers = gguf.load(path).config.n_layers
    for fail, skip in ((False, False), (True, False), (False, True)):
        sent: list = []
        dev = cls(0, SimpleNamespace(allReduce=lambda *a, sent=sent: sent.append(a[2:5])), rank=0)
        dev.fail_decode_capture, dev.skip_all_reduce = fail, skip
        model = Model(gguf.load(path), dev, n_ctx=64, all_reduce=dev.all_reduce)
        try:
            tokens, logits = greedy(Session(model), PROMPT, N_GREEDY)
        finally:
            model.close()
        if skip:  # rank 0 alone, no all-reduce at all: still one model's output
            assert not sent and tokens == reference[0]
            continue
        assert tokens == reference[0]
        np.testing.assert_allclose(logits, reference[1], rtol=1e-4, atol=1e-4)
        assert sent and all(dtype == 7 and op == 0 for _, dtype, op in sent)
        for ops in dev.graphs.values():  # the folded schedule is what the backend recorded: matmul, add, all_reduce
            names = [n for n, _ in ops]
            assert names.count("all_reduce") == names.count("add") == 2 * layers
            assert all(names[i - 1] == "add" for i, n in enumerate(names) if n == "all_reduce")
        if fail:
            assert dev._eager_steps and all(k not in dev.graphs for k in dev._eager_steps)
            assert capsys.readouterr().err.count("decoding without graphs") == 1
