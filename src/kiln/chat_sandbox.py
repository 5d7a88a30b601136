"""The chat-template render process: jinja2's sandbox configured as HF transformers configures it, with limits.

Run as a script (`python chat_sandbox.py MAX_CHARS MAX_INT_BITS MEMORY_BYTES`) by kiln.chat, which talks to it
over stdin/stdout, one JSON object a line. It imports only the standard library and jinja2 (not kiln, whose
package pulls in numpy), so it starts fast and its memory limit is measured from a small base. A template that
runs too long is stopped by the parent killing this process: a C-level operation (a huge integer power) cannot
be interrupted inside a process, by a signal or a thread.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # kiln's own modules (gguf.py, tokenizer.py, ...) must not shadow anything jinja2 imports

from jinja2 import TemplateError, TemplateSyntaxError  # noqa: E402
from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: E402

try:  # POSIX only; elsewhere the parent's timeout is the only limit
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

CACHED_TEMPLATES = 8  # a process serves one or two models' templates; keep their compiled forms


class LimitExceeded(Exception):
    """A template asked for more than the render limits allow (raised before the work is done)."""


class GuardedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, plus checks on the operators that build huge values in one C call: `9 ** 99999999`,
    `'x' * 10**9`, `s + s` doubling in a loop. jinja2's sandbox already caps range() at 100000 items."""

    intercepted_binops = frozenset({"+", "*", "**"})

    def __init__(self, max_chars: int, max_int_bits: int):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        self.max_chars, self.max_int_bits = max_chars, max_int_bits
        self.filters["tojson"] = tojson
        self.globals["raise_exception"] = raise_exception
        self.globals["strftime_now"] = strftime_now

    def call_binop(self, context, operator: str, left, right):
        if operator == "**":
            self._check_power(left, right)
        elif operator == "*":
            self._check_product(left, right)
        else:
            self._check_sum(left, right)
        return super().call_binop(context, operator, left, right)

    def _check_power(self, base, exp) -> None:
        if _is_int(base) and _is_int(exp) and exp > 0 and abs(base) > 1:
            bits = exp * abs(base).bit_length()
            if bits > self.max_int_bits:
                raise LimitExceeded(f"{base} ** {exp} would be a {bits}-bit integer (limit {self.max_int_bits} bits)")

    def _check_product(self, left, right) -> None:
        if _is_int(left) and _is_int(right):
            bits = abs(left).bit_length() + abs(right).bit_length()
            if bits > self.max_int_bits:
                raise LimitExceeded(f"a product of {bits} bits (limit {self.max_int_bits} bits)")
            return
        seq, n = (left, right) if _is_int(right) else (right, left)
        if _is_int(n) and isinstance(seq, str | list | tuple) and len(seq) * n > self.max_chars:
            raise LimitExceeded(
                f"repeating a {type(seq).__name__} of length {len(seq)} {n} times exceeds {self.max_chars} items"
            )

    def _check_sum(self, left, right) -> None:
        if isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
            if len(left) + len(right) > self.max_chars:
                raise LimitExceeded(f"a concatenation of {len(left) + len(right)} items (limit {self.max_chars})")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """HF transformers' tojson: plain json.dumps, not jinja2's HTML-escaping, ASCII-only one."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def raise_exception(message) -> None:
    raise TemplateError(message)


def strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class Renderer:
    """Compiles (with a small cache) and renders templates under the output cap."""

    def __init__(self, max_chars: int, max_int_bits: int):
        self.env = GuardedEnvironment(max_chars, max_int_bits)
        self.max_chars = max_chars
        self._compiled: dict[str, object] = {}

    def render(self, template: str, context: dict) -> str:
        compiled = self._compiled.get(template)
        if compiled is None:
            compiled = self.env.from_string(template)
            if len(self._compiled) >= CACHED_TEMPLATES:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[template] = compiled
        parts, size = [], 0
        for piece in compiled.generate(**context):
            size += len(piece)
            if size > self.max_chars:
                raise LimitExceeded(f"the prompt grew past {self.max_chars} characters")
            parts.append(piece)
        return "".join(parts)


def describe(e: BaseException, memory_bytes: int) -> str:
    """One line for the user: what failed, with the template line number when jinja2 knows it."""
    if isinstance(e, MemoryError):
        limit = f" (limit {memory_bytes >> 20} MiB)" if memory_bytes else ""
        return f"it ran out of memory{limit}"
    if isinstance(e, RecursionError):
        return "recursion too deep (a macro or include that calls itself?)"
    if isinstance(e, TemplateSyntaxError):
        text = f"syntax error on line {e.lineno}: {e.message}"
    elif isinstance(e, TemplateError | LimitExceeded):
        text = str(e)
    else:
        text = f"{type(e).__name__}: {e}"
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def limit_memory(extra_bytes: int) -> int:
    """Cap the address space at its current size plus extra_bytes, so a huge allocation raises MemoryError here
    instead of swapping the machine. Returns the limit set, or 0 where the OS gives no way to (macOS, Windows)."""
    if resource is None or not hasattr(resource, "RLIMIT_AS") or extra_bytes <= 0:
        return 0
    try:
        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = current + extra_bytes
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        return extra_bytes
    except (OSError, ValueError):
        return 0


def limit_cpu(seconds: float) -> None:
    """The kernel ends this process (SIGXCPU) once it has used `seconds` more CPU time: a render still running
    after the parent died (no one left to kill it) cannot spin forever."""
    if resource is None or not hasattr(resource, "RLIMIT_CPU"):
        return
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(usage.ru_utime + usage.ru_stime + seconds) + 1
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    except (OSError, ValueError):
        pass


def serve(max_chars: int, max_int_bits: int, memory_bytes: int) -> None:
    """Answer render requests until stdin closes (the parent exited or shut us down)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; the parent stops us
    if resource is not None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the CPU-time limit's SIGXCPU must not dump a core
    renderer = Renderer(max_chars, max_int_bits)
    memory = limit_memory(memory_bytes)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    for line in stdin:
        try:
            request = json.loads(line)
            limit_cpu(request["cpu_seconds"])
            reply = {"text": renderer.render(request["template"], request["context"])}
        except BaseException as e:  # noqa: BLE001 - any failure of the template is reported, not fatal
            reply = {"error": describe(e, memory)}
        stdout.write(json.dumps(reply).encode("ascii") + b"\n")  # ASCII: lone surrogates survive the pipe
        stdout.flush()


if __name__ == "__main__":
    serve(*(int(a) for a in sys.argv[1:4]))
