"""The decode-step fusion pass (runtime/fusion.py) on a step recorded from a tiny random model, on the CPU: the
fused plan has the expected ops per layer, and a norm whose output is still read later is not absorbed."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from kiln import gguf
from kiln.model import Model
from kiln.runtime.fusion import Fuser
from kiln.runtime.numpy_backend import NumpyDevice
from kiln.session import solo

OPS = ("embed", "rms_norm", "matmul", "rope", "attention", "swiglu", "add", "gather_rows")
LAYER = ["gemv_qkv", "attend", "gemv_res", "gemv_glu", "gemv_res"]


class RecordingDevice(NumpyDevice):
    """NumPy device whose replay() records the step's ops (name, args) as the GPU backends do, and runs them."""

    def __init__(self):
        super().__init__()
        self.steps: list[list] = []
        self._rec = None
        for name in OPS:
            setattr(self, name, self._recorder(name, getattr(self, name)))

    def _recorder(self, name, run):
        signature = inspect.signature(run)

        def op(*args):
            if self._rec is not None:  # every argument, defaults included (matmul's bias), as the backends record
                bound = signature.bind(*args)
                bound.apply_defaults()
                self._rec.append((name, tuple(bound.arguments.values())))
            run(*args)

        return op

    def replay(self, key, step):
        self._rec = []
        try:
            step()
        finally:
            self.steps.append(self._rec)
            self._rec = None


def tid(t):
    return t.storage.__array_interface__["data"][0]  # where the tensor's memory starts


@pytest.fixture(scope="module")
def decode_ops(tiny_models):
    """The ops of one decode step (T = 1) of a tiny 2-layer Llama, with the model (kept alive for the tensors)."""
    dev = RecordingDevice()
    model = Model(gguf.load(tiny_models(Q.Q8_0)), dev, n_ctx=32)
    solo(model).prefill([1, 2, 3])
    solo(model).step([4])
    ops = dev.steps[-1]
    assert ops[0][1][2].shape[0] == 1  # a decode step
    return model, ops


def fuse(ops, gemv_ok=lambda x, *w: True):
    return Fuser(tid, gemv_ok, kv_dtype="f32").fuse(ops)


def test_decode_step_fuses_to_five_ops_per_layer(decode_ops):
    model, ops = decode_ops
    n_layers = len(model.layers)
    assert [n for n, _ in ops].count("matmul") == 7 * n_layers + 1
    plan = fuse(ops)
    assert [n for n, _ in plan] == ["embed", *LAYER * n_layers, "gather_rows", "rms_norm", "matmul"]
    for i in range(n_layers):
        qkv = plan[1 + 5 * i][1]
        x, norm = qkv[0], qkv[1]
        assert norm is not None and norm[0] is model.layers[i].attn_norm  # the attention norm was absorbed
        assert x.shape == (1, model.cfg.d_model)
        glu = plan[4 + 5 * i][1]
        assert glu[1] is not None and glu[1][0] is model.layers[i].ffn_norm
    # the output head's norm is in place (its output is its input): it stays a norm of its own
    assert plan[-2][0] == "rms_norm"


def test_norm_still_read_later_is_not_absorbed(decode_ops):
    model, ops = decode_ops
    ops = list(ops)
    # After layer 0's attention, read h (the attention norm's output) once more: the norm must run on its own.
    at = next(i for i, (n, _) in enumerate(ops) if n == "attention")
    h = ops[at - 5][1][0]  # the q matmul's input
    x = ops[1][1][0]
    decode = next(a for key, a in model._acts.items() if key[0] == 1)
    ops.insert(at + 1, ("add", (h, x, decode.up)))
    plan = fuse(ops)
    names = [n for n, _ in plan]
    assert names[:4] == ["embed", "rms_norm", "gemv_qkv", "attend"]
    assert plan[2][1][1] is None and tid(plan[2][1][0]) == tid(h)  # the QKV GEMV reads the norm's output
    assert names[4] == "add"
    # the other layer still fuses completely
    assert names[-8:] == [*LAYER, "gather_rows", "rms_norm", "matmul"]


def test_nothing_fuses_without_gemv_kernels(decode_ops):
    _, ops = decode_ops
    assert [n for n, _ in fuse(ops, gemv_ok=lambda x, *w: False)] == [n for n, _ in ops]


def test_kv_cache_dtype_mismatch_keeps_qkv_unfused(decode_ops):
    _, ops = decode_ops
    plan = Fuser(tid, lambda x, *w: True, kv_dtype="f16").fuse(ops)  # NumPy's caches are f32
    names = [n for n, _ in plan]
    assert "gemv_qkv" not in names and "attention" in names
    assert names.count("gemv_glu") == 2 and names.count("gemv_res") == 4
    assert np.all([n != "attend" for n in names])
