"""`kiln serve` end to end: the official openai client and raw httpx against a real uvicorn server (conftest.py).

Greedy outputs are compared with kiln.generate and `kiln run` on the same model, so a server bug that changes
the text (wrong template, mixed streams, lost tokens) shows up as a plain string mismatch. max_tokens stays
small: the numpy backend decodes a few tokens per second on a shared CPU.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from kiln import api, cli
from kiln.generate import generate

QUESTION = "What is 2+2?"
PROMPT = "The capital of France is"
N = 8


def client(served, **kw) -> openai.OpenAI:
    kw.setdefault("api_key", served.api_key)
    return openai.OpenAI(base_url=served.url + "/v1", max_retries=0, timeout=120, **kw)


def raw(served, key: str | None = "default") -> httpx.Client:
    headers = {"Authorization": f"Bearer {served.api_key if key == 'default' else key}"} if key else {}
    return httpx.Client(base_url=served.url, headers=headers, timeout=120)


def chat_prompt(served, question: str = QUESTION) -> str:
    return api.apply_chat_template(served.model, [{"role": "user", "content": question}])


def reference(served, prompt: str, max_tokens: int = N, **kw) -> str:
    """What kiln.generate says with no server in between (the server must be idle: one KV cache)."""
    served.idle()
    return generate(served.model, served.model.tokenizer, prompt, max_tokens=max_tokens, **kw)


def auth(served) -> dict:
    return {"Authorization": f"Bearer {served.api_key}"}


def health(served) -> dict:
    """/health with its details (model, load), which need the API key when one is set."""
    return httpx.get(served.url + "/health", headers=auth(served)).json()


def metrics(served) -> str:
    return httpx.get(served.url + "/metrics", headers=auth(served)).text


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# --- happy paths with the official client ----------------------------------------------------------------------


def test_models_and_health(served):
    ids = [m.id for m in client(served).models.list().data]
    assert ids == [served.model_id] and served.model_id == "SmolLM2-135M-Instruct.Q4_1"
    assert client(served).models.retrieve(served.model_id).id == served.model_id
    h = health(served)
    assert h["status"] == "ok" and h["model"] == served.model_id and h["n_ctx"] == 1024
    assert {"queue_depth", "active_requests", "backend"} <= h.keys()


def test_chat_equals_generate_and_kiln_run(served, monkeypatch, capsys):
    r = client(served).chat.completions.create(
        model=served.model_id, temperature=0, max_tokens=N, messages=[{"role": "user", "content": QUESTION}]
    )
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert text == reference(served, chat_prompt(served))
    ids = served.model.tokenizer.encode(chat_prompt(served))
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")
    assert (r.choices[0].finish_reason == "length") == (r.usage.completion_tokens == N)

    served.idle()
    monkeypatch.setattr(api, "load", lambda *a, **k: served.model)  # same weights, no second load
    assert cli.main(["run", QUESTION, "--backend", "numpy", "--ctx", "1024", "-n", str(N)]) == 0
    assert capsys.readouterr().out == text + "\n"


def test_chat_stream_with_usage(served):
    whole = client(served).chat.completions.create(
        model="default", temperature=0, max_tokens=N, messages=[{"role": "user", "content": QUESTION}]
    )
    chunks = list(
        client(served).chat.completions.create(
            model=served.model_id,
            temperature=0,
            max_tokens=N,
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": QUESTION}],
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_completions_stream_and_not(served):
    want = reference(served, PROMPT, 6)
    r = client(served).completions.create(model=served.model_id, prompt=PROMPT, max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    assert r.usage.prompt_tokens == len(served.model.tokenizer.encode(PROMPT))
    chunks = list(
        client(served).completions.create(
            model=served.model_id, prompt=PROMPT, max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"
    # token ids are a valid prompt too
    ids = served.model.tokenizer.encode(PROMPT)
    r2 = client(served).completions.create(model=served.model_id, prompt=ids, max_tokens=6, temperature=0)
    assert r2.choices[0].text == want


def test_stop_string(served):
    full = reference(served, PROMPT, 6)
    word = full.split()[2]
    want = full[: full.index(word)]
    for stop in (word, [word, "\u2603never"]):
        r = client(served).completions.create(
            model=served.model_id, prompt=PROMPT, max_tokens=6, temperature=0, stop=stop
        )
        assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    chunks = list(
        client(served).completions.create(
            model=served.model_id, prompt=PROMPT, max_tokens=6, temperature=0, stop=word, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs(served):
    r = client(served).chat.completions.create(
        model=served.model_id,
        temperature=0,
        max_tokens=4,
        logprobs=True,
        top_logprobs=3,
        messages=[{"role": "user", "content": QUESTION}],
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 4
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)  # greedy
    assert "".join(e.token for e in content).strip() == r.choices[0].message.content.strip()

    c = client(served).completions.create(model=served.model_id, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    streamed = list(
        client(served).chat.completions.create(
            model=served.model_id,
            temperature=0,
            max_tokens=4,
            logprobs=True,
            stream=True,
            messages=[{"role": "user", "content": QUESTION}],
        )
    )
    tokens = [
        e.token for ch in streamed if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content
    ]
    assert tokens == [e.token for e in content]


def test_sampling_parameters(served):
    kw = dict(
        model=served.model_id,
        prompt=PROMPT,
        max_tokens=5,
        temperature=0.9,
        top_p=0.9,
        seed=1234,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    a = client(served).completions.create(**kw).choices[0].text
    b = client(served).completions.create(**kw).choices[0].text
    assert a == b  # same seed, same text
    r = client(served).chat.completions.create(
        model=served.model_id,
        max_completion_tokens=3,
        temperature=0,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
    )
    assert r.usage.completion_tokens <= 3


# --- concurrency -----------------------------------------------------------------------------------------------


def test_concurrent_streams_do_not_mix(served):
    questions = ["Name a color.", "What is the capital of France?"]
    solo = [reference(served, chat_prompt(served, q), 6) for q in questions]
    out: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            msgs = [{"role": "user", "content": questions[i]}]
            s = client(served).chat.completions.create(
                model=served.model_id, temperature=0, max_tokens=6, stream=True, messages=msgs
            )
            out[i] = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors and [out.get(0), out.get(1)] == solo


def test_n_choices_share_the_prompt(served):
    """n=3 greedy: three choices, each equal to kiln.generate; streamed, each chunk names its choice."""
    want = reference(served, PROMPT, max_tokens=6)
    body = {"model": served.model_id, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "n": 3}
    with raw(served) as c:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert [ch["index"] for ch in out["choices"]] == [0, 1, 2]
        assert [ch["text"] for ch in out["choices"]] == [want] * 3
        assert out["usage"]["completion_tokens"] == 18
        texts = ["", "", ""]
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    for ch in json.loads(line[6:])["choices"]:
                        texts[ch["index"]] += ch["text"]
        assert texts == [want] * 3


def test_queue_full_and_disconnect_frees_slot(served):
    """Two held streams fill --max-concurrency 2: a third request gets 429. Dropping the queued stream frees its
    slot at once; dropping the active one stops its generation at the next token, so the next request runs."""
    served.idle()
    body = {
        "model": served.model_id,
        "prompt": "Once upon a time",
        "max_tokens": 1000,
        "temperature": 0,
        "stream": True,
    }
    before = metrics(served)
    with raw(served) as ca, raw(served) as cb, raw(served) as cc:
        with ca.stream("POST", "/v1/completions", json=body) as a:
            assert a.status_code == 200
            lines = a.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))  # a token: A is generating
            with cb.stream("POST", "/v1/completions", json=body) as b:
                assert b.status_code == 200  # admitted: it runs in the same batch as A
                busy = cc.post("/v1/completions", json={**body, "stream": False})
                assert busy.status_code == 429
                assert busy.json()["error"]["code"] == "rate_limit_exceeded"
            wait_for(served, lambda h: h["queue_depth"] + h["active_requests"] == 1)  # B dropped: its slot is free
            t0 = time.monotonic()
            r = cc.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
            assert r.status_code == 200, r.text  # C runs beside A, not after A's 1000 tokens
            assert r.json()["usage"]["completion_tokens"] == 2
            assert time.monotonic() - t0 < 60
    served.idle()
    after = metrics(served)
    assert metric(after, "kiln_cancelled_requests_total") - metric(before, "kiln_cancelled_requests_total") == 2
    assert metric(after, "kiln_generation_tokens_total") - metric(before, "kiln_generation_tokens_total") < 500
    assert metric(after, "kiln_rejected_requests_total") > metric(before, "kiln_rejected_requests_total")
    h = health(served)
    assert h["queue_depth"] == 0 and h["active_requests"] == 0


def wait_for(served, cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond(health(served)):
        assert time.monotonic() < deadline, health(served)
        time.sleep(0.05)


def test_non_streamed_disconnect_cancels(served):
    served.idle()
    body = {"model": served.model_id, "prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0}
    before = metric(metrics(served), "kiln_cancelled_requests_total")
    with pytest.raises(httpx.ReadTimeout), raw(served) as c:
        c.post("/v1/completions", json=body, timeout=httpx.Timeout(120, read=3))
    assert served.engine.wait_idle(30)  # stopped long before 1000 tokens
    assert metric(metrics(served), "kiln_cancelled_requests_total") == before + 1


# --- bad input: 4xx in OpenAI's error format, and the server keeps serving --------------------------------------

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "Hi"}]
BAD = [
    ("malformed json", COMP, b'{"prompt": "Hi",', 400, "invalid_json", None),
    ("body not an object", COMP, [1, 2], 400, "invalid_type", None),
    ("missing messages", CHAT, {"model": "default"}, 400, "missing_required_parameter", "messages"),
    ("missing prompt", COMP, {"max_tokens": 2}, 400, "missing_required_parameter", "prompt"),
    ("messages wrong type", CHAT, {"messages": "Hi"}, 400, "invalid_type", "messages"),
    ("empty messages", CHAT, {"messages": []}, 400, "invalid_value", "messages"),
    ("message not object", CHAT, {"messages": ["Hi"]}, 400, "invalid_type", "messages[0]"),
    (
        "unknown role",
        CHAT,
        {"messages": [{"role": "wizard", "content": "Hi"}]},
        400,
        "invalid_value",
        "messages[0].role",
    ),
    (
        "content wrong type",
        CHAT,
        {"messages": [{"role": "user", "content": 5}]},
        400,
        "invalid_type",
        "messages[0].content",
    ),
    (
        "image part",
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "invalid_value",
        "messages[0].content",
    ),
    ("prompt wrong type", COMP, {"prompt": {"text": "Hi"}}, 400, "invalid_type", "prompt"),
    ("several prompts", COMP, {"prompt": ["a", "b"]}, 400, "invalid_value", "prompt"),
    ("token id out of range", COMP, {"prompt": [1, 10**9]}, 400, "invalid_value", "prompt"),
    ("negative max_tokens", COMP, {"prompt": "Hi", "max_tokens": -5}, 400, "invalid_value", "max_tokens"),
    ("zero max_tokens", CHAT, {"messages": MSG, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ("huge max_tokens", CHAT, {"messages": MSG, "max_tokens": 10**12}, 400, "invalid_value", "max_tokens"),
    (
        "huge max_completion_tokens",
        CHAT,
        {"messages": MSG, "max_completion_tokens": 10**6},
        400,
        "invalid_value",
        "max_completion_tokens",
    ),
    ("max_tokens string", COMP, {"prompt": "Hi", "max_tokens": "5"}, 400, "invalid_type", "max_tokens"),
    ("max_tokens bool", COMP, {"prompt": "Hi", "max_tokens": True}, 400, "invalid_type", "max_tokens"),
    ("temperature string", CHAT, {"messages": MSG, "temperature": "hot"}, 400, "invalid_type", "temperature"),
    (
        "NaN temperature",
        CHAT,
        b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
        400,
        "invalid_value",
        "temperature",
    ),
    ("negative temperature", CHAT, {"messages": MSG, "temperature": -1}, 400, "invalid_value", "temperature"),
    ("top_p zero", CHAT, {"messages": MSG, "top_p": 0}, 400, "invalid_value", "top_p"),
    ("n=17", CHAT, {"messages": MSG, "n": 17}, 400, "invalid_value", "n"),
    ("n=0", CHAT, {"messages": MSG, "n": 0}, 400, "invalid_value", "n"),
    ("stop wrong type", COMP, {"prompt": "Hi", "stop": 5}, 400, "invalid_type", "stop"),
    ("stop list of ints", COMP, {"prompt": "Hi", "stop": [1]}, 400, "invalid_value", "stop"),
    ("presence too big", COMP, {"prompt": "Hi", "presence_penalty": 3}, 400, "invalid_value", "presence_penalty"),
    ("top_logprobs without logprobs", CHAT, {"messages": MSG, "top_logprobs": 2}, 400, "invalid_value", "top_logprobs"),
    ("logprobs too many", COMP, {"prompt": "Hi", "logprobs": 100}, 400, "invalid_value", "logprobs"),
    ("stream wrong type", COMP, {"prompt": "Hi", "stream": "yes"}, 400, "invalid_type", "stream"),
    (
        "stream_options without stream",
        COMP,
        {"prompt": "Hi", "stream_options": {"include_usage": True}},
        400,
        "invalid_value",
        "stream_options",
    ),
    ("tools", CHAT, {"messages": MSG, "tools": [{"type": "function"}]}, 400, "invalid_value", "tools"),
    ("unknown model", CHAT, {"model": "gpt-4o", "messages": MSG}, 404, "model_not_found", "model"),
    ("prompt longer than context", COMP, {"prompt": "hello " * 1100}, 400, "context_length_exceeded", "prompt"),
    (
        "chat longer than context",
        CHAT,
        {"messages": [{"role": "user", "content": "hello " * 1100}]},
        400,
        "context_length_exceeded",
        "messages",
    ),
    ("oversized body", COMP, {"prompt": "x" * (70 * 1024)}, 413, "request_too_large", None),
]


def check_error(r: httpx.Response, status: int, code: str | None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code and err["param"] == param
    assert "Traceback" not in r.text and ".py" not in r.text
    return err


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_requests(served, case):
    _, path, body, status, code, param = case
    with raw(served) as c:
        if isinstance(body, bytes):
            r = c.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            r = c.post(path, json=body)
    check_error(r, status, code, param)


def test_oversized_chunked_body(served):
    def parts():  # no Content-Length: the limit must hold while reading
        for _ in range(100):
            yield b"x" * 1024

    with raw(served) as c:
        r = c.post(COMP, content=parts(), headers={"Content-Type": "application/json"})
        check_error(r, 413, "request_too_large")


def test_auth(served):
    for key in (None, "wrong-key"):
        with raw(served, key=key) as c:
            r = c.post(CHAT, json={"messages": MSG, "max_tokens": 1})
            check_error(r, 401, "invalid_api_key")
            assert r.headers["www-authenticate"] == "Bearer"
            check_error(c.get("/v1/models"), 401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        client(served, api_key="wrong-key").models.list()
    with pytest.raises(openai.NotFoundError):
        client(served).chat.completions.create(model="nope", messages=MSG, max_tokens=1)
    assert httpx.get(served.url + "/health").status_code == 200  # health stays open for probes (status only)


def test_unknown_route_and_method(served):
    with raw(served) as c:
        check_error(c.get("/v1/nothing"), 404, "not_found")
        check_error(c.get(CHAT), 405, "method_not_allowed")


def test_still_serving_after_errors(served):
    with raw(served) as c:
        c.post(COMP, content=b"\xff\xfe not json")
        c.post(CHAT, json={"messages": [{"role": "user", "content": "hello " * 1100}]})
        r = c.post(COMP, json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"]


def test_metrics(served):
    with raw(served) as c:
        c.post(COMP, json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
        c.post(COMP, json={"prompt": 5})
    text = metrics(served)
    assert metric(text, "kiln_requests_total", '{endpoint="/v1/completions",status="200"}') >= 1
    assert metric(text, "kiln_requests_total", '{endpoint="/v1/completions",status="400"}') >= 1
    assert metric(text, "kiln_prompt_tokens_total") > 0 and metric(text, "kiln_generation_tokens_total") >= 2
    assert metric(text, "kiln_generation_tokens_per_second") >= 0
    for gauge in ("kiln_queue_depth", "kiln_active_requests"):
        assert f"# TYPE {gauge} gauge" in text
    assert "# TYPE kiln_requests_total counter" in text


# --- the command line -------------------------------------------------------------------------------------------


def test_missing_dependencies_message(monkeypatch):
    from kiln import server
    from kiln.errors import KilnError

    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(KilnError, match=r"pip install 'kiln\[server\]'"):
        server._require_deps()
    args = cli.build_parser().parse_args(["serve"])  # the subcommand still exists
    assert args.host == "127.0.0.1" and args.port == 8080 and args.handler is server.cmd_serve


def test_kiln_serve_subprocess(tmp_path):
    """The real entry point: `kiln serve --port 0` prints its address and answers on loopback."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kiln",
            "serve",
            "--backend",
            "numpy",
            "--ctx",
            "256",
            "--port",
            "0",
            "--api-key",
            "k",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        url, deadline = None, time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "server exited"
            m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
            url = m.group(1) if m else None
        assert url, "no address printed"
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}, timeout=30)
        assert r.status_code == 200 and json.loads(r.text)["data"][0]["context_length"] == 256
    finally:
        proc.terminate()
        proc.wait(30)


def test_load_error_reaches_the_caller():
    """A model that fails to load on the worker thread fails `kiln serve` with that error, not a hang."""
    from kiln.errors import GGUFError
    from kiln.server import Engine

    def bad():
        raise GGUFError("not a GGUF file")

    with pytest.raises(GGUFError, match="not a GGUF"):
        Engine(loader=bad)
