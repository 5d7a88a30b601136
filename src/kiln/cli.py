"""Command line: kiln run | chat | info | devices (plus commands registered by optional modules)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
import time

from . import api, chat
from .errors import KilnError
from .runtime import BACKENDS
from .session import solo


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="path to a GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument(
        "--backend",
        "-b",
        choices=(*BACKENDS, "auto"),
        default=None,
        help="compute backend (default: $KILN_BACKEND or auto: cuda, then a wgpu GPU adapter, then numpy)",
    )
    p.add_argument("--device", type=int, default=None, help="device index within the backend (see `kiln devices`)")
    p.add_argument("--ctx", type=int, default=None, help="context length in tokens (default: min(model, 4096))")
    p.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="split the model over N GPUs of this host (cuda backend, NCCL; default 1)",
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=256, help="maximum tokens to generate (default 256)")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * p(top) (0 = off)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="llama.cpp-style repetition penalty (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--verbose", "-v", action="store_true", help="print load time and prefill/decode speed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="Run Llama-family GGUF models on CUDA, WebGPU or NumPy.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate text for one prompt, streamed to the terminal")
    run.add_argument("prompt", help="the prompt text")
    run.add_argument("--no-chat-template", action="store_true", help="feed the prompt as-is, without the chat template")
    run.add_argument("--system", default=None, help="system message (chat template only)")
    _add_model_args(run)
    _add_sampling_args(run)

    chat = sub.add_parser("chat", help="interactive multi-turn chat (/reset clears history, /exit quits)")
    chat.add_argument("--system", default=None, help="system message")
    _add_model_args(chat)
    _add_sampling_args(chat)

    info = sub.add_parser("info", help="print a GGUF model's architecture, sizes, tensor types and tokenizer")
    info.add_argument("model", nargs="?", default=None, help="path to a GGUF (default: the embedded model)")

    sub.add_parser("devices", help="list the backends and devices kiln can use here")
    for register in _extensions():
        register(sub)
    return parser


def _extensions():
    """Subcommands that live with their feature (bench, selftest, serve); each is optional."""
    found = []
    for mod in ("bench", "selftest", "server"):
        try:
            module = __import__(f"kiln.{mod}", fromlist=["register_cli"])
        except ImportError:
            continue
        found.append(module.register_cli)
    return found


def _sampling(args):
    from .sample import make_logits_processors, make_sampler

    sampler = make_sampler(args.temperature, args.top_k, args.top_p, args.min_p, args.seed)
    procs = make_logits_processors(repeat_penalty=args.repeat_penalty)
    return (None if args.temperature == 0 else sampler), procs


def _load(args):
    model = api.load(
        args.model,
        backend=args.backend,
        device=args.device,
        n_ctx=args.ctx,
        progress=sys.stderr.isatty() or args.verbose,
        quiet=False,
        tensor_parallel=args.tensor_parallel,
    )
    if args.verbose:
        print(f"[loaded {model.cfg.name} on {model.dev.name} in {model.load_seconds:.2f} s]", file=sys.stderr)
    return model


def _stream(model, prompt, args) -> tuple[str, object]:
    from .generate import stream_generate

    sampler, procs = _sampling(args)
    text, last = [], None
    with _ctrl_c_between_tokens() as stop:
        for chunk in stream_generate(
            model, model.tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler, logits_processors=procs
        ):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            text.append(chunk.text)
            last = chunk
            if stop:
                raise KeyboardInterrupt
    return "".join(text), last


@contextlib.contextmanager
def _ctrl_c_between_tokens():
    """While an answer streams, a first Ctrl-C only sets a flag that the token loop turns into KeyboardInterrupt:
    raised wherever the signal lands, the exception can be swallowed (inside a finalizer, Python only prints it) and
    the answer would go on. A second Ctrl-C raises at once (a long prefill). Main thread only (signal's rule)."""
    stop: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(True)

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, old)


def _report(last, args) -> None:
    if args.verbose and last is not None:
        print(
            f"\n[prompt {last.prompt_tokens} tok at {last.prompt_tps:.1f} tok/s, generated "
            f"{last.generation_tokens} tok at {last.generation_tps:.1f} tok/s, finish: {last.finish_reason}]",
            file=sys.stderr,
        )


def _messages(system: str | None, history: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + history


def cmd_run(args) -> int:
    if not args.no_chat_template:
        chat.prestart()  # the template's render process starts while the model loads
    model = _load(args)
    prompt = args.prompt
    if not args.no_chat_template and model.gguf.chat_template:
        prompt = api.apply_chat_template(model, _messages(args.system, [{"role": "user", "content": prompt}]))
    _, last = _stream(model, prompt, args)
    print()
    _report(last, args)
    return 0


def cmd_chat(args) -> int:
    chat.prestart()
    model = _load(args)
    history: list[dict] = []
    print("kiln chat: /reset clears the history, /exit quits, Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history.clear()
            solo(model).reset()
            print("[history cleared]", file=sys.stderr)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        prompt = api.apply_chat_template(model, _messages(args.system, history))
        try:
            answer, last = _stream(model, prompt, args)
        except KeyboardInterrupt:
            answer, last = "", None
            print("\n[stopped]", file=sys.stderr)
            history.pop()  # the interrupted turn is dropped; earlier turns stay
            solo(model).reset()
            continue
        print()
        history.append({"role": "assistant", "content": answer})
        _report(last, args)


def cmd_info(args) -> int:
    from . import gguf
    from .tokenizer import Tokenizer

    path = args.model or api.default_model_path()
    f = gguf.load(path)
    c = f.config
    types: dict[str, int] = {}
    for t in f.tensors.values():
        types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
    n_params = sum(math.prod(t.shape) for t in f.tensors.values())
    tok = Tokenizer.from_gguf_fields(f.tokenizer_fields())
    rows = [
        ("file", f"{path} ({f.file_size / 1e6:.1f} MB)"),
        ("name", c.name),
        ("architecture", c.arch),
        ("parameters", f"{n_params / 1e6:.1f} M"),
        ("layers", c.n_layers),
        ("d_model", c.d_model),
        ("heads", f"{c.n_heads} query, {c.n_kv_heads} kv, head dim {c.head_dim}"),
        ("ffn", c.d_ff),
        ("vocab", c.vocab_size),
        ("context", c.context_length),
        ("rope", c.rope.describe()),
        ("rms eps", f"{c.norm_eps:g}"),
        ("tied embeddings", c.tied_embeddings),
        ("biases", ", ".join(sorted({n.split(".")[2] for n in f.tensors if n.endswith(".bias")})) or "none"),
        ("tensor types", ", ".join(f"{k} x{v}" for k, v in sorted(types.items()))),
        (
            "tokenizer",
            f"{f.metadata.get('tokenizer.ggml.model')} (pre: {f.metadata.get('tokenizer.ggml.pre', '-')}), "
            f"bos {tok.bos_id}, eos {tok.eos_id}",
        ),
        ("chat template", "yes" if f.chat_template else "none"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if f.chat_template:
        print("\n" + f.chat_template)
    return 0


def cmd_devices(args) -> int:
    from .runtime import get_device

    for name in BACKENDS:
        try:
            dev = get_device(name, quiet=True)
        except KilnError as e:
            print(f"{name:<6} unavailable: {e}")
            continue
        listing = getattr(dev, "describe", None)
        print(f"{name:<6} {listing() if listing else dev.name}")
        dev.close()
    return 0


COMMANDS = {"run": cmd_run, "chat": cmd_chat, "info": cmd_info, "devices": cmd_devices}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = COMMANDS.get(args.command) or args.handler
    t0 = time.perf_counter()
    try:
        return handler(args) or 0
    except KilnError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nkiln: interrupted", file=sys.stderr)
        return 130
    finally:
        if os.environ.get("KILN_TIMING"):
            print(f"[total {time.perf_counter() - t0:.2f} s]", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
