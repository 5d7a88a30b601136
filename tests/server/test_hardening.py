"""`kiln serve` against hostile or broken clients: inputs that used to answer 500, a slow chat template, slow and
idle connections, too many connections, Nagle's delay, cross-origin pages and DNS rebinding, what the API key hides.

Most tests run against their own server (`guarded`): a tiny random model whose tokenizer has 64 more tokens than
its embedding has rows and whose chat template takes a second or two, short connection timeouts, no API key.
"""

import json
import socket
import statistics
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import running
from gguf import GGMLQuantizationType as Q

from kiln import api, synth
from kiln.errors import InvalidArgument
from kiln.generate import generate
from kiln.sample import greedy, log_softmax, make_sampler, repetition_penalty
from kiln.server_guard import HostCheck, lone_surrogate_at

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
KEEP_ALIVE = 1.0
MAX_CONNECTIONS = 16
EXTRA_TOKENS = 64  # tokenizer entries past the embedding's rows: decodable ids the model has no row for
SLOW_LOOPS = 4000  # x 1000 iterations of a jinja expression: about 1.5 s on this machine's CPU
SLOW_TEMPLATE = f"{{% for i in range({SLOW_LOOPS}) %}}{{% for j in range(1000) %}}{{{{ '' if i * j < 0 }}}}"
SLOW_TEMPLATE += "{% endfor %}{% endfor %}" + synth.CHATML


class Guarded:
    def __init__(self, port: int, engine):
        self.port, self.engine, self.model = port, engine, engine.model
        self.url = f"http://127.0.0.1:{port}"

    def post(self, path: str, body, headers: dict | None = None) -> httpx.Response:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
        return httpx.post(self.url + path, content=data, headers=headers, timeout=60)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    from kiln.server import Engine, create_app

    orig = synth._byte_tokenizer_fields
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synth, "_byte_tokenizer_fields", lambda vocab: orig(vocab + EXTRA_TOKENS))
        mp.setattr(synth, "CHATML", SLOW_TEMPLATE)
        path = synth.write_model(str(tmp_path_factory.mktemp("guarded") / "tiny.gguf"), synth.SHAPES["tiny"], Q.Q8_0)
    engine = Engine(loader=lambda: api.load(path, backend="numpy", n_ctx=256))
    model = engine.model
    assert model.tokenizer.vocab_size == model.cfg.vocab_size + EXTRA_TOKENS
    app = create_app(engine)
    limits = dict(
        header_timeout=HEADER_TIMEOUT, body_timeout=BODY_TIMEOUT, keep_alive=KEEP_ALIVE, max_connections=MAX_CONNECTIONS
    )
    with running(app, **limits) as port:
        yield Guarded(port, engine)


def check_error(r: httpx.Response, status: int, code: str | None, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code and err["param"] == param, err


def still_serving(g: Guarded) -> None:
    r = g.post("/v1/completions", {"prompt": "ab", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


# --- inputs that answered 500 --------------------------------------------------------------------------------


def test_deeply_nested_json(guarded):
    deep = b"[" * 100_000 + b"]" * 100_000
    check_error(guarded.post("/v1/completions", deep), 400, "invalid_json")
    deep_field = b'{"prompt": "ab", "stop": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    check_error(guarded.post("/v1/chat/completions", deep_field), 400, "invalid_json")
    still_serving(guarded)


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
        ("/v1/completions", b'{"prompt": "\\udfff"}', "prompt"),
        ("/v1/completions", b'{"prompt": "ab", "model": "x\\ud83d"}', "model"),
        ("/v1/completions", b'{"prompt": "ab", "\\ud800": 1}', "\\ud800"),
    ],
)
def test_lone_surrogate(guarded, path, body, param):
    check_error(guarded.post(path, body), 400, "invalid_value", param)
    paired = b'{"prompt": "\\ud83d\\ude00", "max_tokens": 1}'  # a valid pair (an emoji) is fine
    assert guarded.post("/v1/completions", paired).status_code == 200


@pytest.mark.parametrize("penalty", [1e-300, 0.0, -1.0, 1e300])
def test_repetition_penalty_out_of_range(guarded, penalty):
    body = {"prompt": "ab ab ab", "max_tokens": 2, "temperature": 1, "repetition_penalty": penalty}
    check_error(guarded.post("/v1/completions", body), 400, "invalid_value", "repetition_penalty")
    ok = {**body, "repetition_penalty": 0.01, "logprobs": 2}
    r = guarded.post("/v1/completions", ok)  # the smallest allowed: finite probabilities, finite logprobs
    assert r.status_code == 200, r.text


def test_sampler_survives_nan_and_inf():
    logits = np.array([np.nan, 1.0, np.inf, -np.inf, np.inf, 2.0], np.float32)
    assert greedy(logits) == 2
    for seed in range(20):
        assert make_sampler(1.0, seed=seed)(logits) in (2, 4)  # the +inf ties share the top
        assert make_sampler(0.7, top_k=3, top_p=0.9, min_p=0.1, seed=seed)(logits) in (2, 4)
    assert greedy(np.full(4, np.nan, np.float32)) in range(4)
    assert np.isfinite(log_softmax(logits)).all()
    # the case the API bound now refuses: a tiny penalty overflows float32 logits into inf
    with np.errstate(over="ignore", divide="ignore"):
        hot = repetition_penalty(1e-300)([1, 5], np.array([0.0, 3.0, 1.0, 0.0, 0.0, 2.0], np.float32))
    assert np.isinf(hot).any() and make_sampler(1.0, seed=0)(hot) in (1, 5)


def test_token_ids_checked_against_the_model_vocab(guarded):
    vocab = guarded.model.cfg.vocab_size  # the tokenizer decodes up to vocab + EXTRA_TOKENS
    for bad in (vocab, vocab + EXTRA_TOKENS - 1, vocab + EXTRA_TOKENS, -1):
        r = guarded.post("/v1/completions", {"prompt": [5, bad], "max_tokens": 1})
        check_error(r, 400, "invalid_value", "prompt")
        assert str(bad) in r.json()["error"]["message"]
    assert guarded.post("/v1/completions", {"prompt": [5, vocab - 1], "max_tokens": 1}).status_code == 200
    with pytest.raises(InvalidArgument, match=rf"token id {vocab} .*\[0, {vocab}\)"):
        generate(guarded.model, guarded.model.tokenizer, [5, vocab], max_tokens=1)  # the library's entry too


# --- the event loop stays free ------------------------------------------------------------------------------


def test_slow_chat_template_does_not_block_health(guarded):
    result: dict = {}

    def chat() -> None:
        t0 = time.monotonic()
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        result.update(r=guarded.post("/v1/chat/completions", body), seconds=time.monotonic() - t0)

    th = threading.Thread(target=chat)
    th.start()
    worst = 0.0
    with httpx.Client(base_url=guarded.url, timeout=30) as c:
        while th.is_alive():
            t0 = time.monotonic()
            assert c.get("/health").status_code == 200
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.05)
    th.join()
    assert result["r"].status_code == 200, result["r"].text
    assert result["seconds"] > 0.5, "the template was not slow: the test proves nothing"
    assert worst < 0.5, f"/health took {worst:.2f} s while the template rendered ({result['seconds']:.1f} s)"


# --- connections ----------------------------------------------------------------------------------------------


def closed_within(s: socket.socket, seconds: float) -> float:
    """Seconds until the server closes s (reading and discarding any reply); fails if it stays open longer."""
    t0 = time.monotonic()
    s.settimeout(seconds)
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"connection still open after {seconds} s")
    return time.monotonic() - t0


def drip_until_closed(s: socket.socket, byte: bytes, limit: float) -> float:
    """Send one byte every 0.5 s until the server closes s; seconds it took (fails past limit)."""
    t0 = time.monotonic()
    s.settimeout(0.5)
    while True:
        try:
            if not s.recv(4096):
                break
        except TimeoutError:
            pass
        except ConnectionResetError:
            break
        assert time.monotonic() - t0 < limit, "a dripping client is still connected"
        try:
            s.sendall(byte)
        except OSError:
            break
    return time.monotonic() - t0


def test_slowloris_and_idle_connections_are_dropped(guarded):
    idle = guarded.connect()
    slow = guarded.connect()
    slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    # a header byte every 0.5 s: always sending, never finishing the headers
    assert drip_until_closed(slow, b"X", HEADER_TIMEOUT + 3) >= HEADER_TIMEOUT - 0.5
    closed_within(idle, 2.0)  # never sent a byte: the same timer
    # a kept-alive connection is closed after KEEP_ALIVE seconds idle
    kept = guarded.connect()
    kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert kept.recv(4096).startswith(b"HTTP/1.1 200")
    assert closed_within(kept, KEEP_ALIVE + 2.0) >= KEEP_ALIVE - 0.2
    still_serving(guarded)


def test_slow_body_is_dropped(guarded):
    """Headers in time, then the body a byte at a time: closed BODY_TIMEOUT after the headers, and the same when
    an early error reply (413 here) leaves the client still sending its body."""
    for length, want in ((100, None), (10 * 1024 * 1024, b"HTTP/1.1 413")):
        s = guarded.connect()
        head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        s.sendall(head.encode() + f"Content-Length: {length}\r\n\r\n{{".encode())
        if want:
            s.settimeout(5)
            assert s.recv(4096).startswith(want)
        assert drip_until_closed(s, b" ", BODY_TIMEOUT + 3) >= BODY_TIMEOUT - 0.5 - (1 if want else 0)
    still_serving(guarded)


def test_connection_cap(guarded):
    held = [guarded.connect() for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)  # accepted by now
        extra = guarded.connect()
        extra.settimeout(HEADER_TIMEOUT / 2)
        reply = extra.recv(4096)
        assert reply.startswith(b"HTTP/1.1 503"), reply
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "too_many_connections"
        extra.close()
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    still_serving(guarded)


def test_kept_alive_requests_are_fast(guarded):
    """TCP_NODELAY: without it each response waited ~40 ms for the client's delayed ACK."""
    with httpx.Client(base_url=guarded.url, timeout=30) as c:
        c.get("/health")
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            assert c.get("/health").status_code == 200
            times.append(time.perf_counter() - t0)
    assert statistics.median(times) < 0.020, f"median {statistics.median(times) * 1000:.1f} ms"


# --- cross-origin pages, DNS rebinding ---------------------------------------------------------------------------


def test_post_needs_a_json_content_type(guarded):
    body = json.dumps({"prompt": "ab", "max_tokens": 1}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": ctype} if ctype else {}
        r = httpx.post(guarded.url + "/v1/completions", content=body, headers=headers, timeout=30)
        check_error(r, 415, "unsupported_media_type")
    r = guarded.post("/v1/completions", body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_foreign_host_refused(guarded):
    for host in ("evil.example", f"evil.example:{guarded.port}", "127.0.0.1.evil.example", "10.0.0.1"):
        for path in ("/health", "/v1/models"):
            check_error(httpx.get(guarded.url + path, headers={"Host": host}), 400, "invalid_host")
        r = guarded.post("/v1/completions", {"prompt": "ab", "max_tokens": 1}, headers={"Host": host})
        check_error(r, 400, "invalid_host")
    for host in (f"localhost:{guarded.port}", "LOCALHOST", f"127.0.0.1:{guarded.port}", f"[::1]:{guarded.port}"):
        assert httpx.get(guarded.url + "/health", headers={"Host": host}).status_code == 200


def test_no_cors_by_default(guarded):
    origin = {"Origin": "https://evil.example"}
    r = httpx.get(guarded.url + "/v1/models", headers=origin)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = httpx.options(
        guarded.url + "/v1/completions", headers={**origin, "Access-Control-Request-Method": "POST"}, timeout=30
    )
    assert "access-control-allow-origin" not in pre.headers


def test_cors_origins_when_asked(guarded):
    from fastapi.testclient import TestClient

    from kiln.server import create_app

    app = create_app(guarded.engine, allowed_hosts=["testserver"], cors_origins=["https://app.example"])
    c = TestClient(app)  # not entered: the lifespan (which closes the engine) does not run
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    ok = c.options("/v1/completions", headers={"Origin": "https://app.example", **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
    bad = c.options("/v1/completions", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in bad.headers
    assert c.get("/health", headers={"Host": "evil.example"}).status_code == 400  # the Host check still holds


def test_host_check_rules():
    loop = HostCheck("127.0.0.1")
    assert loop.allows("localhost:8080") and loop.allows("[::1]") and not loop.allows("my.box") and not loop.allows("")
    named = HostCheck("127.0.0.1", ["my.box", "Other.Box:9"])
    assert named.allows("my.box:8080") and named.allows("other.box") and not named.allows("evil.example")
    wild = HostCheck("0.0.0.0")
    assert wild.allows("192.168.1.5:8080") and wild.allows("[fe80::1]") and not wild.allows("rebind.evil.example")
    assert HostCheck("127.0.0.1", ["*"]).allows("anything.example") and HostCheck("10.1.2.3").allows("10.1.2.3:80")
    assert lone_surrogate_at({"a": ["ok", {"b": "\udc00"}]}) == "a[1].b" and lone_surrogate_at({"é": "ü"}) is None


# --- what the API key hides (the session server has one) ------------------------------------------------------


def test_api_key_guards_metrics_and_health_details(served):
    r = httpx.get(served.url + "/metrics")
    check_error(r, 401, "invalid_api_key")
    with_key = httpx.get(served.url + "/metrics", headers={"Authorization": f"Bearer {served.api_key}"})
    assert with_key.status_code == 200 and "kiln_requests_total" in with_key.text
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        h = httpx.get(served.url + "/health", headers=headers)
        assert h.status_code == 200 and h.json() == {"status": "ok"}


def test_serve_options_and_help(capsys):
    from kiln import cli

    args = cli.build_parser().parse_args(["serve"])
    limits = (args.header_timeout, args.body_timeout, args.keep_alive_timeout, args.max_connections)
    assert limits == (10.0, 30.0, 5.0, 256)
    assert args.allowed_hosts is None and args.cors_origins is None
    args = cli.build_parser().parse_args(["serve", "--allowed-hosts", "a.box", "*", "--cors-origins", "https://x"])
    assert args.allowed_hosts == ["a.box", "*"] and args.cors_origins == ["https://x"]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    for option in (
        "--header-timeout",
        "--body-timeout",
        "--keep-alive-timeout",
        "--max-connections",
        "--allowed-hosts",
        "--cors-",
    ):
        assert option in out


# --- the CUDA embedding kernel's last guard ----------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0])
def test_cuda_embed_clamps_ids(qtype):
    """Ids past the host checks read row 0 or V-1, never outside the weights (CUDA only; skipped elsewhere)."""
    from helpers import cuda_device_or_skip

    from kiln import quant
    from kiln.runtime.numpy_backend import NumpyDevice

    dev = cuda_device_or_skip()
    try:
        vocab, d = 64, 256
        raw = quant.random_weight(qtype, vocab, d, np.random.default_rng(0), 0.5)
        ref_dev = NumpyDevice()
        clamped = [0, 0, 63, 63, 63, 7]

        def rows(device, ids):
            w = device.load_weight("token_embd.weight", qtype, raw, (vocab, d))
            out = device.empty((len(ids), d))
            device.embed(w, device.upload(np.asarray(ids, np.int32)), out)
            return device.download(out)

        got = rows(dev, [-5, 0, 63, 64, 2**31 - 1, 7])
        np.testing.assert_allclose(got, rows(ref_dev, clamped), rtol=1e-3, atol=1e-3)
    finally:
        dev.close()
