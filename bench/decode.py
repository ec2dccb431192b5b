"""Decode speed: steplab's engine and ``generate`` vs transformers ``generate`` with a static cache, side by side.

    python bench/decode.py --tokenizer DATA_DIR/tokenizer [--preset step1-mini] [--run RUN_DIR] [--batch 1 8]
                           [--tokens 64] [--repeats 3] [--threads 2] [--dtype fp32|bf16] [--compile]
                           [--engine-decode eager static compiled] [--compile-mode default max-autotune-no-cudagraphs]

The same weights in both (ours exported with ``steplab.export.hf.to_hf_state_dict`` into ``LlamaForCausalLM``),
the same dtype, greedy, exactly ``--tokens`` new tokens per row (no stop token), prompts of 16 tokens. Contenders:
``engine MODE`` (the serving engine: continuous batching over the slot KV cache, one request per row, for each
``--engine-decode`` mode: ``eager`` the model's forward over the running rows, ``static``/``compiled`` the
fixed-shape step of steplab/infer/decode.py, compiled once per ``--compile-mode``; its compile happens at engine
start, not timed),
``generate`` (``steplab.infer.sampling.generate``, what ``steplab sample`` runs), ``hf eager`` (transformers
``generate(cache_implementation="static")``, no compilation) and, with ``--compile``, ``hf compiled`` (the same
with ``torch.compile`` on the model's forward; the compile happens in a warm-up round that is not timed).
Rounds alternate between contenders so drift in machine load hits all of them; the best round of each is
reported, one row per contender, with its ratio to ``hf eager`` (and to ``hf compiled``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steplab.config import preset  # noqa: E402
from steplab.data.tokenizer import Tokenizer  # noqa: E402
from steplab.export.hf import llama_config_dict, to_hf_state_dict  # noqa: E402
from steplab.infer.decode import DecodeConfig  # noqa: E402
from steplab.infer.engine import Engine, Request  # noqa: E402
from steplab.infer.sampling import SamplingParams, generate  # noqa: E402
from steplab.models import build_model  # noqa: E402

PROMPT_LEN = 16


def prompts(batch: int) -> list[list[int]]:
    return [[(7 * i + j) % 200 + 10 for j in range(PROMPT_LEN)] for i in range(batch)]


def run_generate(model, batch: int, tokens: int) -> list[list[int]]:
    return generate(model, prompts(batch), SamplingParams(max_new_tokens=tokens, temperature=0))


def run_engine(engine: Engine, batch: int, tokens: int) -> list[list[int]]:
    handles = [engine.submit(Request(prompt=p, max_tokens=tokens, temperature=0)) for p in prompts(batch)]
    out = []
    for h in handles:
        ids = []
        for event in h:
            ids += event.tokens
        out.append(ids)
    return out


def run_hf(hf, batch: int, tokens: int) -> list[list[int]]:
    ids = torch.tensor(prompts(batch))
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                          do_sample=False, cache_implementation="static", pad_token_id=0, eos_token_id=None)
    return out[:, PROMPT_LEN:].tolist()


def timed(fn, *args) -> tuple[float, list[list[int]]]:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="a tokenizer directory (e.g. a quickstart's OUT/data/tokenizer)")
    ap.add_argument("--preset", default="step1-mini", help="random weights of this preset (ignored with --run)")
    ap.add_argument("--run", help="a trained run directory instead of a preset (e.g. a quickstart's OUT/run)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--compile", action="store_true", help="also transformers with torch.compile (slow to compile on CPU)")
    ap.add_argument("--engine-decode", nargs="+", default=["eager"], choices=["eager", "static", "compiled"],
                    help="engine decode modes to run side by side (default: eager)")
    ap.add_argument("--compile-mode", nargs="+", default=["default"],
                    help="torch.compile modes for --engine-decode compiled: default, max-autotune-no-cudagraphs, frozen (freezing + max-autotune)")
    ap.add_argument("--min-bucket", type=int, default=DecodeConfig.min_bucket, help="shortest attention bucket")
    ap.add_argument("--no-buckets", action="store_true", help="fixed-shape decode attends over the whole context")
    args = ap.parse_args()
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = Tokenizer.load(Path(args.tokenizer))
    torch.manual_seed(0)
    if args.run:
        from steplab.train.checkpoint import load_run

        cfg, model, _, _ = load_run(args.run, device="cpu")
        mcfg, name = cfg.model, Path(args.run).name
    else:
        mcfg = dataclasses.replace(preset(args.preset).model, vocab_size=tok.vocab_size)
        model, name = build_model(mcfg), args.preset
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = model.to(dtype).eval()
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in llama_config_dict(mcfg).items() if k != "architectures"})
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict({k: v.float() for k, v in to_hf_state_dict(model.state_dict(), mcfg).items()}, strict=False)
    if mcfg.tie_embeddings:
        hf.tie_weights()
    hf = hf.to(dtype)
    decodes = []  # (contender name, DecodeConfig)
    for mode in args.engine_decode:
        for cm in (args.compile_mode if mode == "compiled" else ["default"]):
            label = f"engine {mode}" + (f" ({cm})" if mode == "compiled" and len(args.compile_mode) > 1 else "")
            decodes.append((label, DecodeConfig(mode=mode, compile_mode=cm, min_bucket=args.min_bucket,
                                                buckets=not args.no_buckets)))
    contenders = {name: None for name, _ in decodes}
    contenders.update({"generate": lambda b: run_generate(model, b, args.tokens),
                       "hf eager": lambda b: run_hf(hf, b, args.tokens)})
    if args.compile:
        hf_c = transformers.LlamaForCausalLM(hf_cfg).eval()
        hf_c.load_state_dict(hf.state_dict())
        hf_c = hf_c.to(dtype)
        hf_c.forward = torch.compile(hf_c.forward, dynamic=False)
        contenders["hf compiled"] = lambda b: run_hf(hf_c, b, args.tokens)
    print(f"{name}: d_model {mcfg.d_model}, {mcfg.n_layer} layers, vocab {mcfg.vocab_size}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}; {args.tokens} new tokens per row, prompt {PROMPT_LEN}")
    print("| batch | contender | tok/s | / hf eager |" + (" / hf compiled |" if args.compile else "") + " same tokens as hf eager |")
    print("|---:|---|---:|---:|" + ("---:|" if args.compile else "") + ":---:|")
    for batch in args.batch:
        engines = []
        for label, dcfg in decodes:
            t = time.perf_counter()
            engine = Engine(model, tok, max_batch=batch, max_len=PROMPT_LEN + args.tokens, decode=dcfg).start()
            if dcfg.mode == "compiled":
                print(f"  ({label}, batch {batch}: engine start with compile {time.perf_counter() - t:.1f} s)", flush=True)
            engines.append(engine)
            contenders[label] = (lambda e: lambda b: run_engine(e, b, args.tokens))(engine)
        try:
            outs = {c: fn(batch) for c, fn in contenders.items()}  # warm-up (and compilation) rounds
            best = {c: float("inf") for c in contenders}
            for _ in range(args.repeats):
                for c, fn in contenders.items():
                    dt, outs[c] = timed(fn, batch)
                    best[c] = min(best[c], dt)
        finally:
            for engine in engines:
                engine.stop()
        rate = {c: batch * args.tokens / best[c] for c in contenders}
        # greedy tokens agree unless two logits tie within rounding (possible in bf16, random weights)
        for c in contenders:
            cols = [f"{rate[c]:,.0f}", f"{rate[c] / rate['hf eager']:.2f}"]
            if args.compile:
                cols.append(f"{rate[c] / rate['hf compiled']:.2f}")
            print(f"| {batch} | {c} | " + " | ".join(cols) + f" | {'yes' if outs[c] == outs['hf eager'] else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
