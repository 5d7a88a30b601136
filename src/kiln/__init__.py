"""kiln: LLM inference for Llama-family GGUF models on CUDA, WebGPU and NumPy, with conformance-tested kernels."""

from .api import apply_chat_template, default_model_path, load
from .errors import KilnError
from .generate import generate, generate_step, stream_generate
from .sample import make_logits_processors, make_sampler

__version__ = "0.1.0"

__all__ = [
    "KilnError",
    "apply_chat_template",
    "default_model_path",
    "generate",
    "generate_step",
    "load",
    "make_logits_processors",
    "make_sampler",
    "stream_generate",
]
