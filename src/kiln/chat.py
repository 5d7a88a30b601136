"""Chat templates: the GGUF's own jinja2 template (tokenizer.chat_template), rendered in a sandbox."""

from __future__ import annotations

from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import KilnError

ROLES = ("system", "user", "assistant", "tool")


def _raise(message: str):
    raise TemplateError(message)


def render(
    template: str, messages: list[dict], add_generation_prompt: bool = True, bos_token: str = "", eos_token: str = ""
) -> str:
    """Render messages with the model's template, as HF transformers' apply_chat_template does."""
    for m in messages:
        if m.get("role") not in ROLES:
            raise KilnError(f"unknown chat role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise KilnError("each chat message needs a string 'content'")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token
        )
    except TemplateError as e:
        raise KilnError(f"chat template failed: {e}") from None
