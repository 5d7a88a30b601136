"""Tensor-parallel sharding on the CPU: byte slices dequantize to exact slices of the full matrix for every format,
and n simulated ranks (threads + a Barrier all-reduce) give the unsharded Model's logits through prefill and decode."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from kiln import gguf, quant, synth
from kiln.gguf import ModelConfig, TensorInfo
from kiln.model import Model
from kiln.rope import Rope
from kiln.runtime.numpy_backend import NumpyDevice
from kiln.session import solo
from kiln.shard import ShardedFile, ShardError, SimulatedTP, plan, plan_for, run_simulated, shard_tensor, slice_cols

IDS = [1, 504, 345, 314, 289, 28, 17, 42, 400, 7]
DECODE = 3  # the last tokens go one by one: the sharded KV cache must carry the prefill
# hd = 128, 2 heads per rank at n=4: attn_output columns split on multiples of 256, as K-quants need.
WIDE = synth.Shape(1, 1024, 8, 2, 1024, vocab_size=512, context_length=64)
UNEVEN = synth.Shape(1, 256, 4, 2, 288, vocab_size=512, context_length=64)  # d_ff = 9 blocks of 32


def config(**kw) -> ModelConfig:
    base = dict(
        arch="llama",
        name="t",
        n_layers=1,
        d_model=1024,
        n_heads=4,
        n_kv_heads=2,
        head_dim=256,
        d_ff=1024,
        vocab_size=512,
        context_length=64,
        rope=Rope(1e4, neox=False),
        norm_eps=1e-5,
        tied_embeddings=True,
        qkv_bias=False,
    )
    return ModelConfig(**(base | kw))


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_models):
    """(qtype, arch, shape name) -> path; tiny comes from the shared fixture."""
    root, cache = tmp_path_factory.mktemp("shard"), {}
    shapes = {"wide": WIDE, "uneven": UNEVEN}

    def make(qtype: Q, arch: str = "llama", shape: str = "tiny") -> str:
        if shape == "tiny":
            return tiny_models(qtype, arch)
        key = (qtype, arch, shape)
        if key not in cache:
            cache[key] = synth.write_model(
                str(root / f"{shape}-{arch}-{qtype.name}.gguf"), shapes[shape], qtype, arch=arch, seed=int(qtype)
            )
        return cache[key]

    return make


_REF: dict[str, np.ndarray] = {}


def reference(path: str) -> np.ndarray:
    """The unsharded Model's last-token logits after the prefill and after each decode step."""
    if path not in _REF:
        m = Model(gguf.load(path), NumpyDevice(), n_ctx=32)
        rows = [m.dev.download(solo(m).prefill(IDS[:-DECODE]))[0]]
        rows += [m.dev.download(solo(m).step([t]))[0] for t in IDS[-DECODE:]]
        _REF[path] = np.stack(rows)
        m.close()
    return _REF[path]


# --- plans ----------------------------------------------------------------------------------------------------------
def test_plan_splits_heads_kv_groups_and_ffn_evenly():
    p = plan(config(n_heads=8, n_kv_heads=4, head_dim=128), 2)
    assert [r.heads for r in p.ranks] == [(0, 4), (4, 8)]
    assert [r.kv_heads for r in p.ranks] == [(0, 2), (2, 4)]
    assert [r.ffn for r in p.ranks] == [(0, 512), (512, 1024)]
    assert not p.kv_replicated


def test_plan_replicates_kv_heads_when_fewer_than_ranks():
    p = plan(config(n_heads=8, n_kv_heads=2, head_dim=128, d_ff=2048), 8)
    assert p.kv_replicated
    assert [r.kv_heads for r in p.ranks] == [(0, 1)] * 4 + [(1, 2)] * 4  # each rank: the head its query heads use
    mha = plan(config(n_heads=4, n_kv_heads=1), 4)
    assert all(r.kv_heads == (0, 1) for r in mha.ranks)


def test_plan_deals_uneven_ffn_in_whole_blocks():
    p = plan(config(d_ff=288), 4, ffn_align=32)  # 9 blocks over 4 ranks
    assert [r.ffn for r in p.ranks] == [(0, 64), (64, 128), (128, 192), (192, 288)]
    assert all(r.ffn[0] % 32 == 0 for r in p.ranks)
    p = plan(config(d_ff=5632), 4)  # TinyLlama: 22 super-blocks of 256
    assert [r.d_ff for r in p.ranks] == [1280, 1536, 1280, 1536]
    assert p.ranks[-1].ffn[1] == 5632


@pytest.mark.parametrize(
    "kw, n, words",
    [
        (dict(n_heads=4), 3, "must divide n_heads"),
        (dict(n_heads=12, n_kv_heads=4, head_dim=64, d_model=768), 3, "KV heads"),  # 4 q heads per rank, groups of 3
        (dict(d_ff=512), 4, "only 2 blocks"),
        (dict(), 0, "at least 1 rank"),
    ],
)
def test_plan_rejects_unsupported_splits(kw, n, words):
    with pytest.raises(ShardError, match=words):
        plan(config(**kw), n)


# --- byte slicing ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", quant.SUPPORTED, ids=lambda t: t.name)
@pytest.mark.parametrize("n", [2, 4])
def test_shard_tensor_slices_are_exact_for_every_format(qtype, n):
    """Dequantizing a rank's bytes gives exactly its slice of the dequantized full matrix, and the ranks tile it."""
    rng = np.random.default_rng(int(qtype))
    cfg = config()  # 4 heads of 256 over 2 KV heads, d_ff 1024
    p = plan(cfg, n, ffn_align=GGML_QUANT_SIZES[qtype][0])
    hd = cfg.head_dim
    # name -> (shape, axis of the split, each rank's range): small stand-ins for the other dimension.
    layout = {
        "attn_q": ((1024, 256), 0, lambda s: (s.heads[0] * hd, s.heads[1] * hd)),
        "attn_k": ((512, 256), 0, lambda s: (s.kv_heads[0] * hd, s.kv_heads[1] * hd)),
        "ffn_up": ((1024, 256), 0, lambda s: s.ffn),
        "attn_output": ((6, 1024), 1, lambda s: (s.heads[0] * hd, s.heads[1] * hd)),
        "ffn_down": ((6, 1024), 1, lambda s: s.ffn),
    }
    for name, ((rows, cols), axis, span) in layout.items():
        info = TensorInfo(f"blk.0.{name}.weight", qtype, (rows, cols), quant.random_weight(qtype, rows, cols, rng))
        whole = quant.dequantize(info.raw, qtype, cols)
        pieces = []
        for r in range(n):
            shard, (lo, hi) = shard_tensor(info, r, p), span(p[r])
            want = whole[lo:hi] if axis == 0 else whole[:, lo:hi]
            got = quant.dequantize(shard.raw, qtype, shard.shape[1])
            assert shard.shape == want.shape == shard.raw.shape[:1] + (shard.shape[1],)
            np.testing.assert_array_equal(got, want, err_msg=f"{qtype.name} {name} rank {r}/{n}")
            pieces.append(got)
        if name != "attn_k" or not p.kv_replicated:
            np.testing.assert_array_equal(np.concatenate(pieces, axis=axis), whole)  # each element on one rank
    norm = TensorInfo("blk.0.ffn_norm.weight", Q.F32, (1024,), np.zeros(4096, np.uint8))
    assert shard_tensor(norm, n - 1, p) is norm  # replicated


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16], ids=lambda t: t.name)
def test_bias_vectors_split_with_their_rows(qtype):
    cfg = config(n_heads=8, n_kv_heads=2, head_dim=128, qkv_bias=True)
    p = plan(cfg, 4)
    raw = quant.random_weight(qtype, 1, 1024, np.random.default_rng(0)).reshape(-1)
    full = quant.dequantize(raw, qtype, 1024)[0]
    for r in range(4):
        for part, (lo, hi) in (("q", p[r].heads), ("k", p[r].kv_heads)):
            shard = shard_tensor(TensorInfo(f"blk.1.attn_{part}.bias", qtype, (1024,), raw), r, p)
            assert shard.shape == ((hi - lo) * 128,) and shard.raw.ndim == 1
            np.testing.assert_array_equal(
                quant.dequantize(shard.raw, qtype, shard.shape[0])[0], full[lo * 128 : hi * 128]
            )


def test_row_shards_stay_views_of_the_file():
    raw = quant.random_weight(Q.Q4_K, 1024, 1024, np.random.default_rng(1))
    shard = shard_tensor(TensorInfo("blk.0.attn_q.weight", Q.Q4_K, (1024, 1024), raw), 1, plan(config(), 2))
    assert np.shares_memory(shard.raw, raw) and shard.raw.flags.c_contiguous


def test_column_shards_are_views_too():
    """No host copy at sharding time (a 70B model's attn_output and ffn_down shards would be gigabytes): the strided
    view dequantizes to the same values as a contiguous copy."""
    raw = quant.random_weight(Q.Q4_0, 64, 1024, np.random.default_rng(1))
    p = plan(config(), 2)
    shard = shard_tensor(TensorInfo("blk.0.ffn_down.weight", Q.Q4_0, (64, 1024), raw), 1, p)
    assert np.shares_memory(shard.raw, raw) and not shard.raw.flags.c_contiguous
    lo, hi = p[1].ffn
    want = quant.dequantize(raw, Q.Q4_0, 1024)[:, lo:hi]
    np.testing.assert_array_equal(quant.dequantize(shard.raw, Q.Q4_0, hi - lo), want)
    assert shard.nbytes == 64 * (hi - lo) // 32 * 18


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_llama_70b_shape_splits_over_1_2_4_8(n):
    """The benchmark's 70B shape (64 heads, 8 KV heads, d_ff 28672) in Q4_0: even heads, KV groups and FFN blocks."""
    s = synth.SHAPES["llama-70b"]
    cfg = config(n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, head_dim=s.d_model // s.n_heads, d_ff=s.d_ff)
    p = plan(cfg, n, ffn_align=32)
    assert {r.n_heads for r in p.ranks} == {64 // n} and {r.n_kv_heads for r in p.ranks} == {8 // n}
    assert {r.d_ff for r in p.ranks} == {28672 // n} and not p.kv_replicated
    assert all(r.heads[0] * 128 % 32 == 0 for r in p.ranks)  # attn_output splits on Q4_0 blocks


def test_misaligned_column_split_raises_a_clear_error(models):
    info = TensorInfo(
        "blk.0.attn_output.weight", Q.Q4_K, (4, 512), quant.random_weight(Q.Q4_K, 4, 512, np.random.default_rng(2))
    )
    with pytest.raises(
        ShardError,
        match=r"blk.0.attn_output.weight \(Q4_K\) cannot be split at column 128.*"
        r"multiples of 256",
    ):
        slice_cols(info, 0, 128)
    # The tiny model's heads are 64 wide: 2 ranks split attn_output at column 128, inside a K-quant super-block.
    with pytest.raises(ShardError, match="Q6_K.*column 128"):
        ShardedFile(models(Q.Q6_K), 1, 2)


# --- simulated tensor-parallel forward ------------------------------------------------------------------------------
CASES = [(q, "tiny") for q in (Q.Q8_0, Q.Q4_0, Q.F16)] + [(q, "wide") for q in (Q.Q4_K, Q.Q6_K)]


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("qtype, shape", CASES, ids=lambda v: getattr(v, "name", v))
def test_sharded_forward_equals_unsharded(models, qtype, shape, n):
    path = models(qtype, shape=shape)
    got = run_simulated(path, n, IDS, decode=DECODE, n_ctx=32)
    np.testing.assert_allclose(got, reference(path), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [2, 4])  # n=4: the two KV heads (and their biases) are replicated over rank pairs
def test_qwen2_biases_and_kv_replication(models, n):
    path = models(Q.Q8_0, "qwen2")
    sf = ShardedFile(path, 0, n)
    assert sf.config.qkv_bias and sf.config.n_kv_heads == 1 and sf.plan.kv_replicated == (n == 4)
    np.testing.assert_allclose(
        run_simulated(path, n, IDS, decode=DECODE, n_ctx=32), reference(path), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("n", [2, 4])
def test_uneven_ffn_split(models, n):
    path = models(Q.Q8_0, shape="uneven")
    assert {r.d_ff for r in ShardedFile(path, 0, n).plan.ranks} == ({128, 160} if n == 2 else {64, 96})
    np.testing.assert_allclose(
        run_simulated(path, n, IDS, decode=DECODE, n_ctx=32), reference(path), rtol=1e-4, atol=1e-4
    )


def test_sharded_file_looks_like_a_gguf_file(models):
    path = models(Q.Q8_0)
    src = gguf.load(path)
    sf = ShardedFile(src, 1, 2)
    assert sf.config == dataclasses.replace(src.config, n_heads=2, n_kv_heads=1, d_ff=256)
    assert sf.metadata["llama.attention.head_count"] == 2 and sf.metadata["kiln.tensor_parallel.size"] == 2
    assert sf.chat_template == src.chat_template and sf.tokenizer_fields() == src.tokenizer_fields()
    assert sf.tensors["token_embd.weight"] is src.tensors["token_embd.weight"]
    assert sf.tensors["blk.0.attn_output.weight"].shape == (256, 128)
    assert sum(sf.tensors[f"blk.0.{k}.weight"].nbytes for k in ("attn_q", "ffn_down")) * 2 == sum(
        src.tensors[f"blk.0.{k}.weight"].nbytes for k in ("attn_q", "ffn_down")
    )
    with pytest.raises(ShardError, match="different model config"):
        ShardedFile(src, 0, plan(dataclasses.replace(src.config, d_ff=1024), 2))


def test_all_ranks_agree_and_a_failing_rank_does_not_hang(models):
    path = models(Q.Q4_0)
    tp = SimulatedTP(path, 2, n_ctx=32, timeout=10)
    try:
        a, b = tp.prefill(IDS[:4])
        np.testing.assert_array_equal(a, b)  # same sum order on every rank: bit-identical residual streams

        def boom(*args, **kwargs):
            raise RuntimeError("rank 1 died")

        tp.models[1].forward = boom
        with pytest.raises(RuntimeError, match="rank 1 died"):
            tp.step([5])
    finally:
        tp.close()


def test_plan_for_aligns_ffn_to_the_files_block_size(models):
    assert plan_for(gguf.load(models(Q.F16)), 4).ranks[1].ffn == (128, 256)
    assert [r.ffn[0] % 256 for r in plan_for(gguf.load(models(Q.Q4_K, shape="wide")), 4).ranks] == [0] * 4
