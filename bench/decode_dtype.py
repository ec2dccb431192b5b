"""bf16 vs fp32 KV-cached decode speed on this machine, side by side in one process (picks the serving default).

    python bench/decode_dtype.py [--preset step1-mini] [--batch 1 8] [--tokens 64] [--repeats 3] [--threads 2]

An untrained, randomly initialised model (speed does not depend on the weights' values); weights and KV cache
in the measured dtype, as ``steplab serve/sample/chat --dtype`` run them. Rounds alternate fp32/bf16 so drift in
machine load hits both; the best round of each is reported with the ratio bf16/fp32 (> 1: bf16 faster).
"""
from __future__ import annotations

import argparse
import time

import torch

from steplab.config import preset
from steplab.infer.sampling import SamplingParams, generate
from steplab.models import build_model


def tokens_per_s(model, batch: int, tokens: int, prompt_len: int = 16) -> float:
    prompts = [[(7 * i + j) % 200 + 10 for j in range(prompt_len)] for i in range(batch)]
    params = SamplingParams(max_new_tokens=tokens, temperature=0)
    started = time.perf_counter()
    generate(model, prompts, params)  # no stop ids: exactly `tokens` per row
    return batch * tokens / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="step1-mini")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab-size", type=int, default=4096, help="the quickstart tokenizer's size")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import dataclasses

    cfg = dataclasses.replace(preset(args.preset).model, vocab_size=args.vocab_size)
    fp32 = build_model(cfg).to(args.device).eval()
    bf16 = build_model(cfg).to(args.device).eval()
    bf16.load_state_dict(fp32.state_dict())
    bf16.to(torch.bfloat16)
    print(f"{args.preset}: d_model {cfg.d_model}, {cfg.n_layer} layers, vocab {cfg.vocab_size}, device {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| batch | fp32 tok/s | bf16 tok/s | bf16/fp32 |")
    print("|---:|---:|---:|---:|")
    for batch in args.batch:
        tokens_per_s(fp32, batch, 4), tokens_per_s(bf16, batch, 4)  # warm-up
        best = {"fp32": 0.0, "bf16": 0.0}
        for _ in range(args.repeats):
            best["fp32"] = max(best["fp32"], tokens_per_s(fp32, batch, args.tokens))
            best["bf16"] = max(best["bf16"], tokens_per_s(bf16, batch, args.tokens))
        print(f"| {batch} | {best['fp32']:,.0f} | {best['bf16']:,.0f} | {best['bf16'] / best['fp32']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
