"""Chat templates: the GGUF's own jinja2 template (tokenizer.chat_template), rendered in a sandbox, in a process.

A GGUF's template is code from the file's author. jinja2's sandbox stops it from reaching Python's internals,
not from asking for `9 ** 99999999` or `'x' * 10**9`, which hang or abort a process in one C call that no signal
or thread can interrupt. So templates render in a separate, reused process (chat_sandbox.py) that the caller
kills when it runs past its time budget; there the address space is capped (where the OS allows) and the output
is capped, and cheap operator checks make the common abuses fail at once with a precise message.

The render process is started with subprocess (a fresh interpreter, like multiprocessing's "spawn", never a
fork of a parent that may hold CUDA contexts and threads), not with multiprocessing itself: a multiprocessing
child re-imports the user's __main__, which re-runs a script without an `if __name__ == "__main__"` guard
(the README's example), and it would import kiln and numpy where only jinja2 is needed.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from .errors import KilnError

ROLES = ("system", "user", "assistant", "tool")

RENDER_TIMEOUT_S = 10.0  # a real template renders in milliseconds; past this it is looping or hostile
MAX_PROMPT_CHARS = 16 << 20  # far past any context window (16 Mi characters is ~4 M tokens)
MAX_INT_BITS = 1 << 16  # integers a template may build with * and ** (about 20 000 decimal digits)
WORKER_MEMORY_BYTES = 1 << 30  # address space a render process may add to its start-up size (Linux)
POOL_SIZE = 2  # render processes at most: concurrent server requests render side by side
_STOP_WAIT_S = 2.0  # how long a render process gets to exit on its own at shutdown

_SANDBOX_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_sandbox.py")


class ChatTokenizer(Protocol):
    """What render_prompt needs from kiln.tokenizer.Tokenizer."""

    bos_id: int | None
    eos_id: int | None
    add_bos: bool

    def token_text(self, token_id: int | None) -> str: ...


class _Worker:
    """One render process and the thread that reads its replies (a queue get with a timeout works everywhere,
    where select() on a pipe does not on Windows)."""

    def __init__(self, limits: Sequence[int]):
        kwargs: dict = {"start_new_session": True}  # Ctrl-C in a terminal goes to kiln, not to the renderer
        if sys.platform == "win32":  # pragma: no cover
            kwargs = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        self.proc = subprocess.Popen(
            [sys.executable, _SANDBOX_SCRIPT, *(str(n) for n in limits)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},  # finds what we find
            **kwargs,
        )
        self.replies: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        threading.Thread(target=self._read, name="kiln-chat-reader", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if not line.endswith(b"\n"):
                break  # cut short: the process died while writing
            self.replies.put(line)
        self.replies.put(None)  # end of file: the process exited or was killed

    def ask(self, request: bytes, timeout: float) -> bytes | None:
        """Send one request and wait for its reply line; None when the process died; queue.Empty on timeout."""
        try:
            self.proc.stdin.write(request)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        return self.replies.get(timeout=timeout)

    def stop(self, wait: float = 0.0) -> None:
        """Close stdin (an idle renderer exits by itself), then kill it if it has not exited after `wait` s."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Died(Exception):
    """The render process exited before it replied (args: its exit code)."""


class RenderPool:
    """Up to `size` render processes, started on demand and reused; render() is blocking and thread-safe."""

    def __init__(
        self,
        size: int = POOL_SIZE,
        max_chars: int = MAX_PROMPT_CHARS,
        max_int_bits: int = MAX_INT_BITS,
        memory_bytes: int = WORKER_MEMORY_BYTES,
    ):
        self.size = size
        self.limits = (max_chars, max_int_bits, memory_bytes)
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._cond = threading.Condition()

    def prestart(self) -> None:
        """Start one render process now (returns at once), so the first render does not wait for its start-up."""
        with self._cond:
            if not self._all:
                self._release(self._spawn(), healthy=True)

    def render(self, template: str, context: dict, timeout: float = RENDER_TIMEOUT_S) -> str:
        request = _request(template, context, timeout)
        deadline = time.monotonic() + timeout
        try:
            reply = self._ask(request, deadline, timeout)
        except _Died:  # killed between renders (from outside): once more, on a fresh process
            try:
                reply = self._ask(request, deadline, timeout)
            except _Died as e:
                raise KilnError(f"chat template failed: the render process died (exit code {e.args[0]})") from None
        return _text_of(reply)

    def _ask(self, request: bytes, deadline: float, timeout: float) -> bytes:
        worker = self._acquire(deadline)
        reply = None
        try:
            reply = worker.ask(request, max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            raise KilnError(
                f"chat template failed: it did not finish within {timeout:g} s and was stopped "
                "(the model's tokenizer.chat_template loops or computes too much)"
            ) from None
        finally:  # no reply (a timeout, a Ctrl-C while waiting): the process is killed, its late reply never read
            self._release(worker, healthy=reply is not None)
        if reply is None:
            raise _Died(worker.proc.returncode)  # set: _release reaped it
        return reply

    def pids(self) -> list[int]:
        """The render processes' ids (for tests and diagnostics)."""
        with self._cond:
            return [w.proc.pid for w in self._all]

    def close(self) -> None:
        with self._cond:
            workers, self._idle, self._all = list(self._all), [], set()
        for w in workers:
            w.stop(_STOP_WAIT_S)

    def _spawn(self) -> _Worker:
        try:
            w = _Worker(self.limits)
        except OSError as e:
            raise KilnError(f"chat template failed: cannot start the render process ({e})") from None
        self._all.add(w)
        return w

    def _acquire(self, deadline: float) -> _Worker:
        with self._cond:
            while not self._idle and len(self._all) >= self.size:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    raise KilnError("chat template failed: every render process stayed busy past the time budget")
            return self._idle.pop() if self._idle else self._spawn()

    def _release(self, worker: _Worker, healthy: bool) -> None:
        with self._cond:
            if healthy and worker in self._all:
                self._idle.append(worker)
                self._cond.notify()
                return
        self._discard(worker)

    def _discard(self, worker: _Worker) -> None:
        worker.proc.kill()  # a timed-out render is stopped here, mid C call if need be
        worker.proc.wait()
        with self._cond:
            self._all.discard(worker)
            self._cond.notify()

    def _forget_after_fork(self) -> None:
        """In a forked child the parent's render processes are not ours to use or to stop; our copies of their
        pipes are closed, so that they still see end-of-file when the parent exits."""
        for w in self._all:
            for pipe in (w.proc.stdin, w.proc.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
        self._idle, self._all, self._cond = [], set(), threading.Condition()


def _request(template: str, context: dict, timeout: float) -> bytes:
    try:
        body = json.dumps({"template": template, "context": context, "cpu_seconds": timeout})
    except (TypeError, ValueError, RecursionError) as e:
        raise KilnError(f"chat messages must be plain JSON values (strings, numbers, lists, dicts): {e}") from None
    return body.encode("ascii") + b"\n"


def _text_of(reply: bytes) -> str:
    answer = json.loads(reply)
    if "error" in answer:
        raise KilnError(f"chat template failed: {answer['error']}")
    return answer["text"]


_POOL = RenderPool()
atexit.register(_POOL.close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOL._forget_after_fork)


def prestart() -> None:
    """Start the shared render process in the background (call before a slow model load)."""
    _POOL.prestart()


def check_messages(messages: list[dict]) -> None:
    for m in messages:
        if m.get("role") not in ROLES:
            raise KilnError(f"unknown chat role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise KilnError("each chat message needs a string 'content'")


def render(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    timeout: float = RENDER_TIMEOUT_S,
) -> str:
    """Render messages with the model's template, as HF transformers' apply_chat_template does (same jinja2
    settings, loopcontrols, tojson, raise_exception, strftime_now). Blocking and thread-safe; every failure is
    a KilnError of one line."""
    check_messages(messages)
    context = {
        "messages": messages,
        "add_generation_prompt": add_generation_prompt,
        "bos_token": bos_token,
        "eos_token": eos_token,
        "tools": None,  # HF passes these as None when not given; templates test `tools is not none`
        "documents": None,
    }
    text = _POOL.render(template, context, timeout)
    if not text.strip():
        raise KilnError("chat template rendered an empty prompt")
    return text


def render_prompt(
    template: str,
    tokenizer: ChatTokenizer,
    messages: list[dict],
    add_generation_prompt: bool = True,
    timeout: float = RENDER_TIMEOUT_S,
) -> str:
    """The prompt string for `tokenizer.encode` (which adds BOS itself when the model says so): rendered with
    the tokenizer's BOS/EOS texts, minus the template's own leading BOS, as llama.cpp's common/chat.cpp does."""
    bos = tokenizer.token_text(tokenizer.bos_id)
    text = render(template, messages, add_generation_prompt, bos, tokenizer.token_text(tokenizer.eos_id), timeout)
    return strip_template_bos(text, bos, tokenizer.add_bos)


def strip_template_bos(text: str, bos_token: str, add_bos: bool) -> str:
    """Templates that open with `{{ bos_token }}` (Llama 3, Mistral, DeepSeek-R1-Distill) would give BOS BOS
    once the encoder adds its own; the template's one goes (only when the encoder will add one)."""
    if add_bos and bos_token and text.startswith(bos_token):
        return text[len(bos_token) :]
    return text
