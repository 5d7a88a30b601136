"""`kiln serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one loaded model.

Scheduling: kiln.engine runs the continuous-batching scheduler on its own thread. Every running request takes
one token per step, prompts are prefilled in chunks beside them (--token-budget), admission is first come, first
served while the paged KV cache (--kv-tokens) has blocks, and --max-concurrency bounds queued + running requests.
Prompts that start alike (a system prompt, an earlier chat turn) share their full KV blocks (the prefix cache).

FastAPI and uvicorn are optional (`pip install 'kiln[server]'`): they are imported only when a server is built,
so `kiln --help` works without them and `kiln serve` says what to install. (No `from __future__ import
annotations` here: FastAPI must see the real `Request` class on the route functions built inside create_app.)
"""

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from . import __version__ as _kiln_version
from .engine import END, Engine, Job, Metrics
from .errors import ContextOverflow, KilnError
from .server_wire import (
    ApiError,
    GenRequest,
    Reply,
    invalid,
    parse_messages,
    parse_prompt,
    parse_request,
    sse,
    usage_of,
)

log = logging.getLogger("kiln.server")

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB: far more than any prompt that fits a context, small enough to refuse abuse
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds to send a request's headers (slowloris; idle fresh connections)
DEFAULT_BODY_TIMEOUT = 30.0  # seconds to send its body after them: a 1 MiB body at >= 35 KB/s
DEFAULT_KEEP_ALIVE = 5.0  # seconds a kept-alive connection may sit idle between requests (uvicorn's default)
DEFAULT_MAX_CONNECTIONS = 256  # open connections; beyond it new ones get 503 and are closed
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


def _require_deps() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise KilnError(
            f"kiln serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'kiln[server]'"
        ) from None


# --- the ASGI app ---------------------------------------------------------------------------------------------


class _MetricsMiddleware:
    """Counts every response by endpoint and status; a bare ASGI middleware so streamed responses count too."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        status: list[int] = []

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
                self.metrics.request(endpoint, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except BaseException:
            if not status:
                self.metrics.request(endpoint, 500)
            raise


class _HostMiddleware:
    """Serves only Host headers the HostCheck allows (DNS rebinding), before routing, /health included."""

    def __init__(self, app, check):
        self.app, self.check = app, check

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
        if self.check.allows(host):
            return await self.app(scope, receive, send)
        e = ApiError(400, f"Host {host!r} is not served here; see kiln serve --allowed-hosts", code="invalid_host")
        body = json.dumps(e.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def create_app(
    engine: Engine,
    model_id: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    bound_host: str = "127.0.0.1",
    allowed_hosts: list[str] | None = None,
    cors_origins: list[str] | None = None,
):
    """The FastAPI app for an engine; `model_id` is the name clients use (default: the GGUF file stem).
    Host headers are checked against bound_host + loopback + allowed_hosts ('*': any); CORS is off unless
    cors_origins names the web origins that may call it."""
    _require_deps()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    from . import api
    from .generate import out_of_range_id, token_id_bound
    from .server_guard import HostCheck, lone_surrogate_at

    model = engine.model
    path = getattr(model.gguf, "path", None) or ""
    model_id = model_id or (os.path.splitext(os.path.basename(str(path)))[0] if path else "") or "kiln"
    aliases = {model_id, "default"}
    created = int(os.path.getmtime(path)) if path and os.path.exists(path) else int(time.time())
    fingerprint = f"kiln-{_kiln_version}-{model.dev.name.split()[0]}"
    n_ctx = model.n_ctx

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(
        title="kiln", version=_kiln_version, docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.engine = engine
    app.state.model_id = model_id
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(_HostMiddleware, check=HostCheck(bound_host, allowed_hosts))
    app.add_middleware(_MetricsMiddleware, metrics=engine.metrics)

    def error(e: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error(e)

    @app.exception_handler(KilnError)
    async def _kiln_error(request, e: KilnError):
        code = "context_length_exceeded" if isinstance(e, ContextOverflow) else None
        return error(ApiError(400, str(e), code=code))

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        return error(ApiError(400, "invalid request", code="invalid_value"))

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):  # logged by uvicorn with its traceback; the client gets no internals
        return error(ApiError(500, "internal server error; see the server log", type="server_error"))

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(
                401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    def authorized(request: Request) -> bool:
        try:
            check_auth(request)
        except ApiError:
            return False
        return True

    def check_model(name: Any) -> None:
        if name is not None and not isinstance(name, str):
            raise invalid("model", "'model' must be a string", "invalid_type")
        if name is not None and name not in aliases:
            raise ApiError(
                404,
                f"the model '{name}' does not exist; this server serves '{model_id}'",
                param="model",
                code="model_not_found",
            )

    async def read_json(request: Request) -> Any:
        """The body as JSON, refusing more than max_body_bytes before reading it all (chunked bodies too).
        A JSON content type is required: a web page can send text/plain cross-origin without a CORS preflight."""
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media != "application/json":
            raise ApiError(
                415,
                f"the request body must be sent as 'Content-Type: application/json', got {media or 'none'!r}",
                code="unsupported_media_type",
            )
        declared = request.headers.get("content-length")
        too_big = ApiError(413, f"request body is larger than {max_body_bytes} bytes", code="request_too_large")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            raise too_big
        data = bytearray()
        try:
            async for part in request.stream():
                data += part
                if len(data) > max_body_bytes:
                    raise too_big
        except ClientDisconnect:
            raise ApiError(400, "the client disconnected while sending the body", code="client_disconnected") from None
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
        where = lone_surrogate_at(body)
        if where is not None:
            raise invalid(where, f"{where} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape)")
        return body

    async def tokenize(req: GenRequest, param: str) -> None:
        if isinstance(req.prompt, list):
            vocab = token_id_bound(model, engine.tokenizer)
            bad = out_of_range_id(req.prompt, vocab)
            if bad is not None:
                raise invalid(param, f"token ids must be in [0, {vocab}), got {bad}")
            ids = list(req.prompt)
        else:
            ids = await run_in_threadpool(engine.tokenizer.encode, req.prompt)
        if not ids:
            raise invalid(param, f"'{param}' is empty")
        if len(ids) >= n_ctx:
            raise ApiError(
                400,
                f"this model's context holds {n_ctx} tokens, but the {param} has {len(ids)} tokens "
                "(leave room for at least one generated token); shorten it",
                param=param,
                code="context_length_exceeded",
            )
        req.prompt_ids = ids

    async def run(request: Request, req: GenRequest):
        job = engine.submit(req, asyncio.get_running_loop())
        reply = Reply(req, model_id, engine.tokenizer, fingerprint)
        if req.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-Id": reply.id}
            return _JobStream(stream_events(job, reply), job, media_type="text/event-stream", headers=headers)
        watcher = asyncio.create_task(watch_disconnect(request, job))
        try:
            choices: list[list] = [[] for _ in range(req.n)]
            while (item := await job.out.get()) is not END:
                if isinstance(item, BaseException):
                    raise item
                choices[item[0]].append(item[1])
        finally:
            watcher.cancel()
            job.cancel()  # no-op when it finished; frees the slot if we are unwinding early
        return JSONResponse(reply.whole(choices, len(req.prompt_ids)), headers={"X-Request-Id": reply.id})

    async def watch_disconnect(request: Request, job: Job) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        job.cancel()

    async def stream_events(job: Job, reply: Reply) -> AsyncIterator[bytes]:
        req = reply.req
        if req.chat:
            for i in range(req.n):
                yield sse(reply.chunk(role=True, index=i))
        offsets, generated = [0] * req.n, [0] * req.n
        while (item := await job.out.get()) is not END:
            if isinstance(item, BaseException):  # headers are sent: report in-band, as OpenAI does
                e = item if isinstance(item, KilnError) else None
                msg = str(e) if e else "internal server error; see the server log"
                yield sse(
                    ApiError(400 if e else 500, msg, type="invalid_request_error" if e else "server_error").body()
                )
                break
            i, chunk = item
            generated[i] = chunk.generation_tokens
            if chunk.text or chunk.finish_reason or (req.logprobs and chunk.logprob is not None):
                yield sse(reply.chunk(chunk, offset=offsets[i], index=i))
            offsets[i] += len(chunk.text)
        if req.include_usage and any(generated):
            yield sse(reply.usage_chunk(usage_of(len(req.prompt_ids), sum(generated))))
        yield b"data: [DONE]\n\n"

    @app.get("/health")
    async def health(request: Request):
        """Open to probes; with an API key set, the details (model, load) only to callers that send it."""
        ok = engine.alive
        status = {"status": "ok" if ok else "error"}
        if authorized(request):
            queued, active = engine.depth()
            status.update(model=model_id, backend=model.dev.name, n_ctx=n_ctx)
            status.update(queue_depth=queued, active_requests=active)
        return JSONResponse(status, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(request: Request):
        check_auth(request)
        return PlainTextResponse(
            engine.metrics.render(*engine.depth()), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    def model_card() -> dict:
        return {
            "id": model_id,
            "object": "model",
            "created": created,
            "owned_by": "kiln",
            "context_length": n_ctx,
            "backend": model.dev.name,
        }

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str, request: Request):
        check_auth(request)
        check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_auth(request)
        body = await read_json(request)
        req = parse_request(body, chat=False, n_ctx=n_ctx)
        check_model(body.get("model"))
        req.prompt = parse_prompt(body)
        await tokenize(req, "prompt")
        return await run(request, req)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        body = await read_json(request)
        req = parse_request(body, chat=True, n_ctx=n_ctx)
        check_model(body.get("model"))
        # a template is a program (loops): rendered on the event loop, a slow one would stall every connection
        req.prompt = await run_in_threadpool(api.apply_chat_template, model, parse_messages(body))
        await tokenize(req, "messages")
        return await run(request, req)

    class _JobStream(StreamingResponse):
        """Cancels its job however the response ends (client gone, server stopping), so the slot is freed."""

        def __init__(self, content, job: Job, **kwargs):
            super().__init__(content, **kwargs)
            self.job = job

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.job.cancel()

    return app


# --- command line ----------------------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """Bind before uvicorn starts so --port 0 works and the real address can be printed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise KilnError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def make_server(
    app,
    log_level: str = "info",
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    keep_alive: float = DEFAULT_KEEP_ALIVE,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
):
    """A uvicorn server for the app with kiln's connection limits (server_guard.protocol_class); run it with
    .run(sockets=[bind(...)])."""
    import uvicorn

    from .server_guard import protocol_class

    timeouts = (
        ("--header-timeout", header_timeout),
        ("--body-timeout", body_timeout),
        ("--keep-alive-timeout", keep_alive),
    )
    for name, value in timeouts:
        if not value > 0:
            raise KilnError(f"{name} must be a positive number of seconds, got {value}")
    if max_connections < 1:
        raise KilnError(f"--max-connections must be at least 1, got {max_connections}")
    config = uvicorn.Config(
        app,
        http=protocol_class(header_timeout, body_timeout, max_connections),
        log_level=log_level,
        timeout_keep_alive=keep_alive,
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


def cmd_serve(args) -> int:
    _require_deps()
    from . import api

    api_key = args.api_key or os.environ.get("KILN_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(
            f"kiln: warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
            file=sys.stderr,
        )
    sock = bind(args.host, args.port)
    try:
        engine = Engine(
            max_concurrency=args.max_concurrency,
            max_seqs=args.max_seqs,
            kv_tokens=args.kv_tokens,
            token_budget=args.token_budget,
            loader=lambda: api.load(
                args.model,
                backend=args.backend,
                device=args.device,
                n_ctx=args.ctx,
                progress=sys.stderr.isatty(),
                quiet=False,
                tensor_parallel=args.tensor_parallel,
            ),
        )
    except BaseException:
        sock.close()
        raise
    model = engine.model
    app = create_app(
        engine,
        model_id=args.model_id,
        api_key=api_key,
        max_body_bytes=args.max_body_bytes,
        bound_host=args.host,
        allowed_hosts=args.allowed_hosts,
        cors_origins=args.cors_origins,
    )
    server = make_server(
        app, args.log_level, args.header_timeout, args.keep_alive_timeout, args.max_connections, args.body_timeout
    )
    host, port = sock.getsockname()[:2]
    print(
        f"kiln: serving {app.state.model_id} ({model.dev.name}, ctx {model.n_ctx}) on http://{host}:{port}/v1",
        flush=True,
    )
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
    return 0


def register_cli(subparsers) -> None:
    from .cli import _add_model_args

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 picks a free one)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $KILN_API_KEY)")
    p.add_argument(
        "--max-concurrency", type=int, default=64, help="requests queued + running before new ones get 429 (default 64)"
    )
    p.add_argument("--max-seqs", type=int, default=64, help="sequences decoded together in one step (default 64)")
    p.add_argument(
        "--kv-tokens",
        type=int,
        default=None,
        help="KV-cache size in tokens over all sequences (default: 8 contexts)",
    )
    p.add_argument(
        "--token-budget", type=int, default=512, help="tokens per step: decode rows plus prompt chunks (default 512)"
    )
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY, help="largest request body (default 1 MiB)")
    p.add_argument(
        "--header-timeout",
        type=float,
        default=DEFAULT_HEADER_TIMEOUT,
        help=f"seconds a client may take to send a request's headers (default {DEFAULT_HEADER_TIMEOUT:g})",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=DEFAULT_BODY_TIMEOUT,
        help=f"seconds a client may take to send a request's body after its headers (default {DEFAULT_BODY_TIMEOUT:g})",
    )
    p.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=DEFAULT_KEEP_ALIVE,
        help=f"seconds an idle kept-alive connection stays open (default {DEFAULT_KEEP_ALIVE:g})",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help=f"open connections before new ones get 503 (default {DEFAULT_MAX_CONNECTIONS})",
    )
    p.add_argument(
        "--allowed-hosts",
        nargs="+",
        default=None,
        metavar="HOST",
        help="Host header names served besides localhost and --host ('*': any; default: those only, against DNS "
        "rebinding)",
    )
    p.add_argument(
        "--cors-origins",
        nargs="+",
        default=None,
        metavar="ORIGIN",
        help="web origins (e.g. https://app.example) whose pages may call the API (default: none, CORS off)",
    )
    p.add_argument("--model-id", default=None, help="model name clients use (default: the GGUF file name stem)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(handler=cmd_serve)
