"""The tensor table: what each architecture reads is loaded (llama's optional biases included, on every backend and
sharded), and a file carrying anything else -- an extra layer, an unknown tensor, experts -- is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from helpers import cuda_device_or_skip, nmse, wgpu_device_or_skip

from kiln import gguf, synth
from kiln.errors import GGUFError, UnsupportedModel
from kiln.model import Model
from kiln.runtime.numpy_backend import NumpyDevice
from kiln.session import solo
from kiln.shard import run_simulated

TINY = synth.SHAPES["tiny"]
BIASES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
IDS = [3, 14, 159, 265, 358, 97, 12, 40]


@pytest.fixture(scope="module")
def biased(tmp_path_factory) -> str:
    return synth.write_model(str(tmp_path_factory.mktemp("bias") / "b.gguf"), TINY, Q.Q8_0, seed=5, biases=BIASES)


def _logits(model: Model, ids: list[int]) -> np.ndarray:
    """Last-token logits after a prefill of all but two tokens and two decode steps (both paths)."""
    solo(model).reset()
    solo(model).prefill(ids[:-2])
    solo(model).step(ids[-2:-1])
    return model.dev.download(solo(model).step(ids[-1:]))[0]


def test_block_count_smaller_than_the_layers_present(tmp_path):
    path = synth.write_model(str(tmp_path / "m.gguf"), TINY, Q.Q8_0, meta_overrides={"llama.block_count": 1})
    with pytest.raises(GGUFError, match=r"'blk\.1\..*' and \d+ more beyond llama.block_count = 1"):
        gguf.load(path)


def test_a_tensor_the_architecture_does_not_read(tmp_path):
    path = synth.write_model(
        str(tmp_path / "m.gguf"), TINY, Q.Q8_0, extra_tensors=(("v", "blk.0.attn_gate.weight", 256, 1.0),)
    )
    with pytest.raises(GGUFError, match=r"'blk\.0\.attn_gate\.weight' that the llama architecture does not read"):
        gguf.load(path)


def test_qwen2_does_not_read_an_output_bias(tmp_path):
    path = synth.write_model(str(tmp_path / "q.gguf"), TINY, Q.Q8_0, arch="qwen2", biases=("attn_output",))
    with pytest.raises(GGUFError, match=r"attn_output\.bias' and 1 more that the qwen2 architecture does not read"):
        gguf.load(path)


def test_mixture_of_experts_is_named_not_a_missing_ffn_gate(tmp_path):
    experts = synth.write_model(str(tmp_path / "e.gguf"), TINY, Q.Q8_0, meta_overrides={"llama.expert_count": 8})
    with pytest.raises(UnsupportedModel, match=r"mixture-of-experts.*llama.expert_count = 8"):
        gguf.load(experts)
    exps = (("m", "blk.0.ffn_gate_exps.weight", 512, 256, Q.Q8_0),)
    tensors = synth.write_model(str(tmp_path / "t.gguf"), TINY, Q.Q8_0, extra_tensors=exps)
    with pytest.raises(UnsupportedModel, match=r"mixture-of-experts.*blk\.0\.ffn_gate_exps\.weight"):
        gguf.load(tensors)


def test_optional_biases_load_only_when_present(tiny_models, biased):
    plain = Model(gguf.load(tiny_models(Q.Q8_0)), NumpyDevice(), n_ctx=16)
    assert all(getattr(plain.layers[0], b) is None for b in ("bq", "bo", "b_gate", "b_up", "b_down"))
    with_bias = Model(gguf.load(biased), NumpyDevice(), n_ctx=16)
    assert all(
        getattr(with_bias.layers[1], b) is not None for b in ("bq", "bk", "bv", "bo", "b_gate", "b_up", "b_down")
    )


@pytest.mark.parametrize("n", [2, 4])
def test_sharded_biases_are_added_once(biased, n):
    """Row-parallel biases (attn_output, ffn_down) live on rank 0 only: on every rank the all-reduce would add n."""
    want = run_simulated(biased, 1, IDS, decode=2, n_ctx=32)
    np.testing.assert_allclose(run_simulated(biased, n, IDS, decode=2, n_ctx=32), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["wgpu", "cuda"])
def test_gpu_backends_add_every_bias_like_numpy(biased, backend):
    """Decode fuses matmuls with norms and residual adds on the GPUs; every fused path must keep the bias."""
    dev = wgpu_device_or_skip() if backend == "wgpu" else cuda_device_or_skip()
    file = gguf.load(biased)
    gpu = Model(file, dev, n_ctx=32)
    try:
        ref = _logits(Model(file, NumpyDevice(), n_ctx=32), IDS)
        got = _logits(gpu, IDS)
        assert np.isfinite(got).all() and nmse(got, ref) < 1e-4
    finally:
        gpu.close()
        dev.close()


def test_biases_match_llama_cpp(tmp_path):
    """llama.cpp as the oracle (skipped where llama-cpp-python is not installed: CI lacks it)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    shape = synth.Shape(2, 256, 4, 2, 512, vocab_size=2048, context_length=512)  # >= 1024: a tokenizer llama.cpp loads
    path = synth.write_model(str(tmp_path / "b.gguf"), shape, Q.F32, seed=7, embed_type=Q.F32, biases=BIASES)
    ids = [int(i) for i in np.random.default_rng(1).integers(10, 2000, 40)]
    model = Model(gguf.load(path), NumpyDevice(), n_ctx=64)
    got = model.dev.download(solo(model).prefill(ids))[0]
    peer = llama_cpp.Llama(model_path=path, n_ctx=64, logits_all=True, verbose=False)
    peer.eval(ids)
    want = np.asarray(peer.scores[len(ids) - 1])
    assert nmse(got, want) < 1e-5 and got.argmax() == want.argmax()
