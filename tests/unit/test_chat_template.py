"""Chat templates: exactly one BOS on real templates (llama.cpp's copies in tests/data/templates), every failure of
a template as one KilnError line, the render process's time, size and memory limits, HF's jinja2 extras, threads.

The vocabularies are the special-token part of llama.cpp's vocab-only GGUFs (tests/data/templates/vocabs.json);
with KILN_LLAMA_VOCABS=<llama.cpp models/ folder> the BOS tests also run on the full GGUFs.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import pytest

from kiln import api, chat
from kiln.errors import KilnError
from kiln.tokenizer import UNUSED, Tokenizer, read_tokenizer_fields

DATA = Path(__file__).resolve().parents[1] / "data" / "templates"
VOCABS = json.loads((DATA / "vocabs.json").read_text(encoding="utf-8"))
FULL_VOCABS = os.environ.get("KILN_LLAMA_VOCABS")

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a GPU."},
    {"role": "assistant", "content": "H200."},
    {"role": "user", "content": "Another?"},
]


@lru_cache
def vocab(name: str, full: bool = False) -> Tokenizer:
    if full:
        return Tokenizer.from_gguf(Path(FULL_VOCABS) / f"ggml-vocab-{name}.gguf")
    v = VOCABS[name]
    n = v["n_tokens"]
    tokens = [f"\ue000{i}\ue001" for i in range(n)]  # placeholders no merge or split can produce
    types, scores = [UNUSED] * n, [0.0] * n
    for i, text, token_type, *score in v["kept"]:
        tokens[i], types[i] = text, token_type
        scores[i] = score[0] if score else 0.0
    fields = {**v["fields"], "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
    if fields["tokenizer.ggml.model"] == "llama":
        fields["tokenizer.ggml.scores"] = scores
    return Tokenizer.from_gguf_fields(fields)


def template(name: str) -> str:
    return (DATA / f"{name}.jinja").read_text(encoding="utf-8")


# --- 1. exactly one BOS ----------------------------------------------------------------------------------------
# (template, vocab, the template opens with {{ bos_token }})
BOS_CASES = [
    ("meta-llama-Llama-3.1-8B-Instruct", "llama-bpe", True),
    ("meta-llama-Llama-3.2-3B-Instruct", "llama-bpe", True),
    ("deepseek-ai-DeepSeek-R1-Distill-Llama-8B", "llama-bpe", True),
    ("mistralai-Mistral-Nemo-Instruct-2407", "llama-spm", True),  # Mistral 7B's SentencePiece vocab, BOS <s>
    ("microsoft-Phi-3.5-mini-instruct", "phi-3", False),  # Phi-3.5's template has no BOS; the encoder adds it
]
SOURCES = ["fixture"] + (["full"] if FULL_VOCABS else [])


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name,vocab_name,opens_with_bos", BOS_CASES, ids=[c[0] for c in BOS_CASES])
def test_prompt_ids_start_with_exactly_one_bos(name, vocab_name, opens_with_bos, source):
    tok = vocab(vocab_name, source == "full")
    bos = tok.token_text(tok.bos_id)
    raw = chat.render(template(name), CHAT, True, bos, tok.token_text(tok.eos_id))
    assert raw.startswith(bos) == opens_with_bos
    if opens_with_bos:
        assert tok.encode(raw)[:2] == [tok.bos_id, tok.bos_id]  # what the chat path encoded before the fix
    ids = tok.encode(chat.render_prompt(template(name), tok, CHAT))
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert tok.decode(ids[1:]) == tok.decode(tok.encode(raw, add_bos=False)[int(opens_with_bos) :])


def test_api_strips_the_template_bos_as_the_server_sees_it():
    """api.apply_chat_template is what the CLI and the server call: the same single BOS."""
    tok = vocab("llama-bpe")
    model = SimpleNamespace(
        gguf=SimpleNamespace(chat_template=template("meta-llama-Llama-3.1-8B-Instruct")), tokenizer=tok
    )
    prompt = api.apply_chat_template(model, CHAT)
    assert prompt.startswith("<|start_header_id|>system<|end_header_id|>")
    assert tok.encode(prompt).count(tok.bos_id) == 1


def test_template_bos_is_kept_when_the_encoder_adds_none():
    """DeepSeek-R1-Distill-Qwen's template writes bos_token; with a vocab whose add_bos is off (Qwen2's), that
    BOS is the only one and must stay, as llama.cpp keeps it."""
    tok = vocab("qwen2")
    assert not tok.add_bos
    name = "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"
    prompt = chat.render_prompt(template(name), tok, CHAT)
    ids = tok.encode(prompt)
    assert prompt.startswith("<|endoftext|>") and ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1


def test_templates_without_bos_are_unchanged(embedded_path):
    qwen = vocab("qwen2")
    t = template("Qwen-Qwen2.5-7B-Instruct")
    assert chat.render_prompt(t, qwen, CHAT) == chat.render(t, CHAT, True, "<|endoftext|>", "<|endoftext|>")
    assert qwen.bos_id not in qwen.encode(chat.render_prompt(t, qwen, CHAT))
    # SmolLM2's BOS is <|im_start|>, the text its ChatML prompt opens with: add_bos is off, so nothing is stripped
    fields = read_tokenizer_fields(embedded_path)
    smol = Tokenizer.from_gguf_fields(fields)
    t = fields["tokenizer.chat_template"]
    raw = chat.render(t, CHAT, True, smol.token_text(smol.bos_id), smol.token_text(smol.eos_id))
    assert raw.startswith(smol.token_text(smol.bos_id)) and not smol.add_bos
    assert chat.render_prompt(t, smol, CHAT) == raw


# --- 2. every failure is one KilnError line --------------------------------------------------------------------
FAILURES = [
    ("{% for %}", "syntax error on line 1"),
    ("{{ raise_exception('roles must alternate') }}", "chat template failed: roles must alternate"),
    ("{% for i in range(10**10) %}{% endfor %}", "OverflowError: Range too big"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion too deep"),
    ("{% include 'other.jinja' %}", "TypeError: no loader"),
    ("{% extends 'base.jinja' %}", "TypeError: no loader"),
    ("{% import 'macros.jinja' as m %}", "TypeError: no loader"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ messages[0].content.__class__.__mro__ }}", "access to attribute '__class__'"),
    ("{{ 1.5 ** 10000 }}", "OverflowError"),
    ("{{ 9 ** 99999999 }}", "9 ** 99999999 would be a 399999996-bit integer"),
    ("{{ 'x' * 10**9 }}", "repeating a str of length 1 1000000000 times"),
    ("{% set ns = namespace(s='xy') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "concat"),
    ("{% set ns = namespace(n=3) %}{% for i in range(30) %}{% set ns.n = ns.n * ns.n %}{% endfor %}", "product"),
    ("{% for i in range(3000) %}{{ 'x' * 9000 }}{% endfor %}", "the prompt grew past"),
    ("{% if false %}x{% endif %}\n   \n", "chat template rendered an empty prompt"),
]


@pytest.mark.parametrize("text,needle", FAILURES, ids=[f[1][:30] for f in FAILURES])
def test_template_failures_are_one_clear_line(text, needle):
    t0 = time.monotonic()
    with pytest.raises(KilnError) as err:
        chat.render(text, CHAT)
    message = str(err.value)
    assert needle in message and "\n" not in message, message
    assert time.monotonic() - t0 < 5, "a guard should fail fast, not wait for the time budget"


def test_real_template_raise_exception():
    with pytest.raises(KilnError, match="roles must alternate user/assistant"):
        chat.render(template("mistralai-Mistral-Nemo-Instruct-2407"), [CHAT[1], CHAT[1]])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the address-space limit needs Linux")
def test_memory_limit_turns_a_huge_allocation_into_an_error():
    with pytest.raises(KilnError, match=r"ran out of memory \(limit 1024 MiB\)"):
        chat.render("{{ '{:>1500000000}'.format(1) }}", CHAT)  # a 1.5 GB string in one C call: no guard sees it
    assert "GPU" in chat.render("{{ messages[1].content }}", CHAT)  # the process survived


def test_bad_messages_are_refused_before_rendering():
    with pytest.raises(KilnError, match="unknown chat role 'robot'"):
        chat.render("{{ 1 }}", [{"role": "robot", "content": "x"}])
    with pytest.raises(KilnError, match="string 'content'"):
        chat.render("{{ 1 }}", [{"role": "user", "content": None}])
    with pytest.raises(KilnError, match="plain JSON values"):
        chat.render("{{ 1 }}", [{"role": "user", "content": "x", "extra": object()}])


# --- 3. time budget, restart, shutdown -------------------------------------------------------------------------
SLOW = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def test_timeout_stops_the_render_and_the_next_one_works():
    t0 = time.monotonic()
    with pytest.raises(KilnError, match="did not finish within 1 s and was stopped"):
        chat.render(SLOW, CHAT, timeout=1.0)
    assert time.monotonic() - t0 < 4
    assert chat.render("{{ messages[1].content }}", CHAT) == "Name a GPU."


def test_timeout_stops_a_c_level_operation():
    """With the ** guard off, 9 ** 999999999 runs inside one C call (no signal or thread reaches it): only killing
    the render process ends it."""
    pool = chat.RenderPool(size=1, max_int_bits=1 << 62)
    try:
        t0 = time.monotonic()
        with pytest.raises(KilnError, match="did not finish within 1 s"):
            pool.render("{{ (9 ** 999999999) % 7 }}", {"messages": []}, timeout=1.0)
        assert time.monotonic() - t0 < 4
        assert pool.pids() == []  # killed, and a fresh one starts on the next render
        assert pool.render("{{ 2 ** 10 }}", {}, timeout=30) == "1024"
    finally:
        pool.close()


def test_a_render_process_killed_between_renders_is_replaced():
    pool = chat.RenderPool(size=1)
    try:
        assert pool.render("{{ 6 * 7 }}", {}) == "42"
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGKILL)
        assert pool.render("{{ 6 * 7 }}", {}) == "42"
        assert pool.pids() != [pid]
    finally:
        pool.close()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has exited (nobody may reap it in a container)


def _run_parent(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True)


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_render_process_exits_with_its_parent():
    parent = _run_parent(
        """
        from kiln import chat
        chat.render("{{ 1 }}", [])
        print(chat._POOL.pids()[0], flush=True)
        """
    )
    pid = int(parent.stdout.readline())
    assert parent.wait(timeout=30) == 0
    assert _gone_within(pid, 5), "the render process outlived a parent that exited normally"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_render_process_dies_when_its_parent_is_killed_mid_render():
    """SIGKILL leaves no atexit: a busy renderer is ended by its CPU-time limit, an idle one by the closed pipe."""
    parent = _run_parent(
        """
        from kiln import chat
        busy, idle = chat.RenderPool(size=1, max_int_bits=1 << 62), chat.RenderPool(size=1)
        busy.prestart(); idle.prestart()
        print(busy.pids()[0], idle.pids()[0], flush=True)
        busy.render("{{ (9 ** 999999999) % 7 }}", {}, timeout=2.0)
        """
    )
    busy, idle = (int(p) for p in parent.stdout.readline().split())
    time.sleep(0.5)
    parent.kill()
    parent.wait()
    assert _gone_within(idle, 5), "an idle render process outlived its killed parent"
    assert _gone_within(busy, 20), "a busy render process outlived its killed parent"


# --- 4. what HF's environment has ------------------------------------------------------------------------------
def test_loop_controls():
    text = (
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "[{{ m.content }}]{% if loop.index >= 3 %}{% break %}{% endif %}{% endfor %}"
    )
    assert chat.render(text, CHAT) == "[Name a GPU.][H200.]"


def test_tojson_is_hf_s():
    messages = [{"role": "user", "content": 'héllo 日本 "q" <b>&'}]
    assert chat.render("{{ messages|tojson }}", messages) == json.dumps(messages, ensure_ascii=False)
    assert chat.render("{{ messages|tojson(indent=2) }}", messages) == json.dumps(
        messages, ensure_ascii=False, indent=2
    )
    got = chat.render("{{ messages[0]|tojson(separators=(',', ':'), sort_keys=true) }}", messages)
    assert got == json.dumps(messages[0], ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    assert chat.render("{{ messages|tojson(ensure_ascii=true) }}", messages) == json.dumps(messages)


def test_strftime_now():
    before = datetime.now().strftime("%Y-%m-%d")
    got = chat.render("{{ strftime_now('%Y-%m-%d') }}", CHAT)
    assert got in (before, datetime.now().strftime("%Y-%m-%d"))


# --- 5. threads, and the cost of a render ---------------------------------------------------------------------
def test_concurrent_renders_get_their_own_answers_while_one_times_out():
    t = template("Qwen-Qwen2.5-7B-Instruct")
    errors: list[str] = []

    def worker(k: int) -> None:
        for i in range(15):
            content = f"thread {k} message {i}"
            out = chat.render(t, [{"role": "user", "content": content}])
            if content not in out or out.count("thread ") != 1:
                errors.append(out)

    def hog() -> None:
        with pytest.raises(KilnError, match="did not finish"):
            chat.render(SLOW, CHAT, timeout=1.0)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)] + [threading.Thread(target=hog)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


def test_warm_render_costs_milliseconds():
    t = template("meta-llama-Llama-3.1-8B-Instruct")
    chat.render(t, CHAT)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        chat.render(t, CHAT)
        times.append(time.perf_counter() - t0)
    assert statistics.median(times) < 0.025, f"warm render median {statistics.median(times) * 1e3:.1f} ms"
