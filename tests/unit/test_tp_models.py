"""bench/make_models.py's streamed parallel writer: the same metadata, tensor list and block rule as synth.write_model
(so the benchmark files load like any synth model), bytes independent of the number of workers, and the 70B shape."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from kiln import gguf, quant, synth

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import make_models  # noqa: E402


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_streamed_file_matches_synth_layout(tmp_path, arch):
    shape = synth.SHAPES["tiny"]
    a = synth.write_model(str(tmp_path / "a.gguf"), shape, Q.Q4_0, arch=arch, embed_type=Q.Q8_0, tied=False)
    b = make_models.write_streaming(
        str(tmp_path / "b.gguf"), shape, Q.Q4_0, arch=arch, embed_type=Q.Q8_0, tied=False, workers=2
    )
    ra, rb = GGUFReader(a), GGUFReader(b)
    assert list(ra.fields) == list(rb.fields)
    for key, field in ra.fields.items():
        if not key.startswith("GGUF."):
            assert field.contents() == rb.fields[key].contents(), key
    layout = lambda r: [(t.name, t.tensor_type, list(t.shape), int(t.n_bytes)) for t in r.tensors]  # noqa: E731
    assert layout(ra) == layout(rb) and os.path.getsize(a) == os.path.getsize(b)
    f = gguf.load(b)
    for name, t in f.tensors.items():
        x = quant.dequantize(t.raw, t.qtype, t.shape[-1])
        assert np.isfinite(x).all() and x.any(), name
        if len(t.shape) == 2:
            assert 0.01 < x.std() < 0.04, name  # synth's scale (0.02) from random blocks with a fixed f16 scale


def test_bytes_do_not_depend_on_workers(tmp_path):
    shape = synth.SHAPES["tiny"]
    one = make_models.write_streaming(str(tmp_path / "1.gguf"), shape, Q.Q8_0, tied=True, workers=1, seed=5)
    two = make_models.write_streaming(str(tmp_path / "2.gguf"), shape, Q.Q8_0, tied=True, workers=3, seed=5)
    with open(one, "rb") as f1, open(two, "rb") as f2:
        assert f1.read() == f2.read()


def test_70b_entry_is_llama_2_70b_in_q4_0():
    shape_name, qtype, tied = make_models.MODELS["llama-70b-q4_0"]
    s = synth.SHAPES[shape_name]
    assert (s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.d_ff, s.vocab_size) == (80, 8192, 64, 8, 28672, 32000)
    assert qtype == Q.Q4_0 and not tied
    nbytes = sum(make_models._nbytes(t) for t in synth.tensor_plan(s, qtype, qtype, tied))
    assert 38.0e9 < nbytes < 39.0e9
