"""OpenAI's wire format for `kiln serve`: errors ({"error": {message, type, param, code}}), request bodies checked
field by field into a GenRequest, and the response objects (whole and streamed chunks) built from generated Chunks.
Plain Python: no FastAPI here, so it is testable and importable without the server extras."""

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

REPETITION_PENALTY = (0.01, 10.0)  # below 0.01, logits / penalty overflow float32 into inf and NaN probabilities
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20
ROLES = ("system", "developer", "user", "assistant", "tool")


# --- errors in OpenAI's format --------------------------------------------------------------------------------


class ApiError(Exception):
    """A request the client must fix (or retry later): becomes {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# --- request parsing --------------------------------------------------------------------------------------------


_KIND_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
}


def _get(body: dict, name: str, kind: type | tuple, default: Any = None) -> Any:
    """body[name] checked against kind (bool is never accepted as a number; int is accepted as float)."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds:
        kinds = (*kinds, int)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(_KIND_NAMES[k] for k in kinds if k is not int or float not in kinds)
        raise invalid(name, f"'{name}' must be {names}, got {json.dumps(value)[:60]}", "invalid_type")
    return value


def _number(
    body: dict, name: str, default: float, lo: float | None = None, hi: float | None = None, lo_open: bool = False
) -> float:
    value = float(_get(body, name, float, default))
    if not math.isfinite(value):
        raise invalid(name, f"'{name}' must be a finite number")
    if (lo is not None and (value < lo or lo_open and value == lo)) or (hi is not None and value > hi):
        lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo:g}"
        hi_s = "" if hi is None else f"<= {hi:g}"
        raise invalid(name, f"'{name}' must be {' and '.join(s for s in (lo_s, hi_s) if s)}, got {value:g}")
    return value


def _integer(body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    value = _get(body, name, int, default)
    if value is None:
        return None
    if lo is not None and value < lo or hi is not None and value > hi:
        raise invalid(name, f"'{name}' must be between {lo} and {hi}, got {value}")
    return value


@dataclass
class GenRequest:
    """Everything the worker needs for one generation, validated; prompt_ids already tokenized."""

    chat: bool
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0
    prompt: str | list[int] = ""
    prompt_ids: list[int] = field(default_factory=list)
    n: int = 1  # choices, sampled independently from one prefilled prompt


def parse_request(body: Any, chat: bool, n_ctx: int) -> GenRequest:
    """Validate an OpenAI (chat) completions body; messages/prompt are checked here and rendered by the caller."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
    r = GenRequest(chat=chat)
    r.stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, {})
    if options and not r.stream:
        raise invalid("stream_options", "'stream_options' is only allowed with \"stream\": true")
    r.include_usage = _get(options, "include_usage", bool, False)
    r.n = _integer(body, "n", 1, 1, MAX_CHOICES)
    limit = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    r.max_tokens = _integer(body, limit, None if chat else 16, 1, n_ctx)
    r.temperature = _number(body, "temperature", 1.0, 0.0)
    r.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _integer(body, "top_k", 0, -1)
    r.top_k = max(top_k, 0)  # -1 means off, as in vLLM
    r.min_p = _number(body, "min_p", 0.0, 0.0, 0.999999)
    seed = _get(body, "seed", int)
    r.seed = None if seed is None else seed & (2**64 - 1)  # OpenAI accepts any int64; numpy wants >= 0
    r.presence_penalty = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    r.frequency_penalty = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    r.repetition_penalty = _number(body, "repetition_penalty", 1.0, *REPETITION_PENALTY)
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP or not all(isinstance(s, str) for s in stop):
        raise invalid("stop", f"'stop' must be a string or a list of at most {MAX_STOP} strings")
    r.stop = [s for s in stop if s]
    if chat:
        r.logprobs = _get(body, "logprobs", bool, False)
        r.top_logprobs = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        if r.top_logprobs and not r.logprobs:
            raise invalid("top_logprobs", "'top_logprobs' needs \"logprobs\": true")
        if body.get("tools") or body.get("functions"):
            raise invalid("tools", "tool calling is not supported by kiln serve")
    else:
        lp = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
        r.logprobs, r.top_logprobs = lp is not None, lp or 0
        if _get(body, "echo", bool, False):
            raise invalid("echo", "'echo' is not supported")
        if _integer(body, "best_of", 1) != 1:
            raise invalid("best_of", "only best_of=1 is supported")
        if _get(body, "suffix", str, ""):
            raise invalid("suffix", "'suffix' (insertion) is not supported")
    return r


def parse_messages(body: dict) -> list[dict]:
    """OpenAI messages -> the plain {role, content: str} list chat templates expect (text parts joined)."""
    if "messages" not in body:
        raise ApiError(400, "'messages' is required", param="messages", code="missing_required_parameter")
    messages = _get(body, "messages", list)
    if not messages:
        raise invalid("messages", "'messages' must be a non-empty array")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(where, f"{where} must be an object with 'role' and 'content'", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood by a text-only model
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise invalid(f"{where}.content", f"{where}.content: only text parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise invalid(
                f"{where}.content", f"{where}.content must be a string or an array of text parts", "invalid_type"
            )
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def parse_prompt(body: dict) -> str | list[int]:
    """A completions prompt: a string, a one-element list of strings, or a list of token ids."""
    if "prompt" not in body or body["prompt"] is None:
        raise ApiError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
        raise invalid("prompt", "only one prompt per request is supported")
    raise invalid("prompt", "'prompt' must be a string or an array of token ids", "invalid_type")


# --- response building ------------------------------------------------------------------------------------------


def _token_info(tok, token_id: int) -> tuple[str, list[int]]:
    piece = tok.piece(token_id)
    return piece.decode("utf-8", errors="replace"), list(piece)


def _chat_logprobs(tok, chunk, top_n: int) -> list[dict]:
    if chunk.token is None or chunk.logprob is None:
        return []
    text, raw = _token_info(tok, chunk.token)
    top = []
    for tid, lp in list((chunk.top_logprobs or {}).items())[:top_n]:
        t, b = _token_info(tok, tid)
        top.append({"token": t, "logprob": lp, "bytes": b})
    return [{"token": text, "logprob": chunk.logprob, "bytes": raw, "top_logprobs": top}]


def _completion_logprobs(tok, chunk, top_n: int, offset: int) -> dict:
    if chunk.token is None or chunk.logprob is None:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    top = {}
    for tid, lp in list((chunk.top_logprobs or {}).items())[:top_n]:
        top.setdefault(_token_info(tok, tid)[0], lp)
    return {
        "tokens": [_token_info(tok, chunk.token)[0]],
        "token_logprobs": [chunk.logprob],
        "top_logprobs": [top],
        "text_offset": [offset],
    }


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


MAX_CHOICES = 16  # choices per request (n): each is a sequence of its own in the batch


class Reply:
    """Builds OpenAI response objects (whole or chunked) for one request."""

    def __init__(self, req: GenRequest, model_id: str, tok, fingerprint: str):
        self.req, self.model_id, self.tok, self.fingerprint = req, model_id, tok, fingerprint
        self.id = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model_id,
            "system_fingerprint": self.fingerprint,
        }

    def chunk(self, chunk=None, role: bool = False, offset: int = 0, index: int = 0) -> dict:
        """One streamed event of choice `index`: the role announcement (chat), a text delta, or the final one with
        finish_reason."""
        r = self.req
        text = "" if chunk is None else chunk.text
        finish = None if chunk is None else chunk.finish_reason
        if r.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text or not finish else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            if r.logprobs and chunk is not None and chunk.logprob is not None:
                choice["logprobs"] = {"content": _chat_logprobs(self.tok, chunk, r.top_logprobs)}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
            if r.logprobs and chunk is not None and chunk.logprob is not None:
                choice["logprobs"] = _completion_logprobs(self.tok, chunk, r.top_logprobs, offset)
            out = {**self._head("text_completion"), "choices": [choice]}
        if r.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, usage: dict) -> dict:
        return {
            **self._head("chat.completion.chunk" if self.req.chat else "text_completion"),
            "choices": [],
            "usage": usage,
        }

    def whole(self, choices: list[list], prompt_tokens: int) -> dict:
        """The whole response: `choices` holds each choice's chunks in order."""
        out = [self._choice(i, chunks) for i, chunks in enumerate(choices)]
        generated = sum(chunks[-1].generation_tokens for chunks in choices if chunks)
        kind = "chat.completion" if self.req.chat else "text_completion"
        return {**self._head(kind), "choices": out, "usage": usage_of(prompt_tokens, generated)}

    def _choice(self, index: int, chunks: list) -> dict:
        r = self.req
        text = "".join(c.text for c in chunks)
        finish = chunks[-1].finish_reason if chunks else "length"
        if r.chat:
            choice = {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
            if r.logprobs:
                choice["logprobs"] = {
                    "content": [e for c in chunks for e in _chat_logprobs(self.tok, c, r.top_logprobs)]
                }
            return choice
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        if r.logprobs:
            merged: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            offset = 0
            for c in chunks:
                for key, vals in _completion_logprobs(self.tok, c, r.top_logprobs, offset).items():
                    merged[key] += vals
                offset += len(c.text)
            choice["logprobs"] = merged
        return choice


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"
