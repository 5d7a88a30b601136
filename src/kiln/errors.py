"""One exception family, so the CLI and server can turn any user-facing failure into one clear line."""


class KilnError(Exception):
    """A problem the user can act on (bad file, bad input, missing backend). Never a bug."""


class GGUFError(KilnError):
    """The model file is missing, not a GGUF, truncated or inconsistent."""


class UnsupportedModel(KilnError):
    """The file is a valid GGUF but uses an architecture or tensor type kiln does not run."""


class UnsupportedOp(KilnError):
    """A backend was asked for an op/dtype combination it does not implement (never a silent fallback)."""


class BackendUnavailable(KilnError):
    """The requested backend or device cannot be used on this machine."""


class ContextOverflow(KilnError):
    """The prompt (plus generation) does not fit in the model's context window."""


class InvalidArgument(KilnError, ValueError):
    """A parameter out of range (sampling settings, token counts)."""


class NonFiniteLogits(KilnError):
    """The forward pass produced NaN/Inf: weights that load but overflow, or a backend bug. Never sampled from."""
