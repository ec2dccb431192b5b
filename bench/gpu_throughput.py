"""GPU training throughput and MFU of Step-1 at ~125M and ~350M N (bf16, torch.compile), one device.

    python bench/gpu_throughput.py [--presets step1-125m step1-350m] [--batch 16] [--seq 2048] [--steps 20]

Prepared for when a GPU is at hand; never run by CI or the tests (it exits with a message without CUDA).
Random tokens (throughput does not depend on the text); forward + backward + fused AdamW, the trainer's own
model and optimizer. MFU = model FLOPs/token (6N + lm_head + attention, see models/dense.py) x tokens/s over
the device's dense bf16 peak (H100/H200: 989 TFLOP/s). Reference: nanochat reports about 46% MFU on H100.
"""
from __future__ import annotations

import argparse
import time

import torch

from steplab.config import TrainConfig, preset
from steplab.models.dense import Step1, count_params, flops_per_token
from steplab.train.metrics import peak_flops
from steplab.train.optim import build_optimizer


def measure(name: str, batch: int, seq: int, steps: int, compile: bool) -> dict:
    cfg = preset(name).model
    cfg.vocab_size, cfg.max_seq_len = 32768, seq
    torch.manual_seed(0)
    model = Step1(cfg).cuda()
    opt = build_optimizer(model, TrainConfig(lr=1e-4), "cuda")
    fn = torch.compile(model) if compile else model
    x = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
    y = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tok_s = batch * seq / dt
    flops = flops_per_token(cfg, seq)["model"]
    return {"preset": name, "N": count_params(cfg)["N"], "tok_s": tok_s, "mfu": flops * tok_s / peak_flops("cuda", "bf16"),
            "mem_gb": torch.cuda.max_memory_allocated() / 1e9, "warmup_s": warm}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["step1-125m", "step1-350m"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (see docs/benchmarks.md for recorded results)")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, peak bf16 {peak_flops('cuda', 'bf16') / 1e12:.0f} TFLOP/s")
    print("| preset | N | batch x seq | tokens/s | MFU | peak mem GB | warm-up s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.presets:
        r = measure(name, args.batch, args.seq, args.steps, not args.no_compile)
        print(f"| {r['preset']} | {r['N'] / 1e6:.0f}M | {args.batch} x {args.seq} | {r['tok_s']:,.0f} | {r['mfu']:.1%} | "
              f"{r['mem_gb']:.1f} | {r['warmup_s']:.0f} |", flush=True)
    print("nanochat reference: ~46% MFU (H100, depth 18)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
