"""HF transformers on the same GPU, as a second peer: a Llama of the benchmark shape with random fp16 weights
(transformers has no GGUF-quantized kernels, so it reads 2 bytes per weight: compare GB/s rather than tok/s).

    python bench/peers/transformers_bench.py --shape tinyllama-1.1b [-p 512 -n 128 -r 3] --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kiln.synth import SHAPES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(SHAPES))
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    s = SHAPES[args.shape]
    cfg = LlamaConfig(
        vocab_size=s.vocab_size,
        hidden_size=s.d_model,
        intermediate_size=s.d_ff,
        num_hidden_layers=s.n_layers,
        num_attention_heads=s.n_heads,
        num_key_value_heads=s.n_kv_heads,
        max_position_embeddings=max(s.context_length, args.p + args.n),
        rope_theta=s.rope_theta,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).half().eval()
    ids = torch.randint(100, s.vocab_size, (1, args.p), device="cuda")

    def prefill() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(ids, use_cache=False).logits[:, -1].argmax()
        torch.cuda.synchronize()
        return args.p / (time.perf_counter() - t0)

    def decode() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids[:, :1], max_new_tokens=args.n, min_new_tokens=args.n, do_sample=False)
        torch.cuda.synchronize()
        return args.n / (time.perf_counter() - t0)

    prefill(), decode()  # warm-up
    pp = [prefill() for _ in range(args.r)]
    tg = [decode() for _ in range(args.r)]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    res = {
        "peer": "transformers",
        "model": f"{args.shape} (random fp16)",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(),
        "prompt_tokens": args.p,
        "generated_tokens": args.n,
        "prefill_tok_s": statistics.fmean(pp),
        "decode_tok_s": statistics.fmean(tg),
        "decode_gb_s": weight_bytes * statistics.fmean(tg) / 1e9,
    }
    import transformers

    res["transformers"] = transformers.__version__
    print(json.dumps(res), flush=True)
    with open(args.json, "w") as fh:
        json.dump([res], fh, indent=1)


if __name__ == "__main__":
    main()
