"""A training step in fp32 vs under bf16 autocast on this machine, side by side in one process (train.dtype=auto).

    python bench/dtype_step.py [--sizes 33k 221k 0.9m step1-mini] [--threads 1] [--rounds 3] [--steps 2]

``train.dtype=auto`` (steplab/train/precision.py) trains in bf16 only where the CPU multiplies bf16 natively (AMX or
AVX512-BF16). This prints what the CPU has, the bf16 and fp32 matmul rates (1024^2) and, per size, the eager
trainer step (forward + backward + clipping + fused AdamW) in both dtypes, rounds interleaved, best round each and
the median ratio. The quickstart's sizes use its shapes (2 layers, 2 heads, vocab 1024, batch 9 x 256);
step1-mini its preset at batch 4 x 256, vocab 8192.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steplab.config import ModelConfig  # noqa: E402
from steplab.models.dense import Step1, count_params  # noqa: E402
from steplab.presets import PRESETS  # noqa: E402
from steplab.train.metrics import measure_matmul_flops  # noqa: E402
from steplab.train.precision import cpu_bf16_features, native_bf16  # noqa: E402

SIZES = {"33k": dict(d_model=32, n_layer=2, n_head=2, vocab_size=1024),
         "221k": dict(d_model=96, n_layer=2, n_head=2, vocab_size=1024),
         "0.9m": dict(d_model=192, n_layer=2, n_head=2, vocab_size=1024)}


def model_config(label: str) -> tuple[ModelConfig, int]:
    if label == "step1-mini":
        m = PRESETS["step1-mini"]["model"]
        return ModelConfig(**{**m, "vocab_size": 8192, "max_seq_len": 256}), 4
    return ModelConfig(**SIZES[label], max_seq_len=256), 9


def make_step(cfg: ModelConfig, batch, bf16: bool):
    torch.manual_seed(0)
    model = Step1(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = model(*batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=[*SIZES, "step1-mini"], choices=[*SIZES, "step1-mini"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="steps per timed round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    features = ", ".join(f"{name} {has}" for name, has in cpu_bf16_features().items())
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {features}; "
          f"native bf16: {native_bf16('cpu')} -> train.dtype=auto picks {'bf16' if native_bf16('cpu') else 'fp32'}")
    bf, fp = measure_matmul_flops("cpu", torch.bfloat16, n=1024, repeats=3), measure_matmul_flops("cpu", torch.float32, n=1024, repeats=3)
    print(f"matmul 1024^2, {args.threads} thread(s): bf16 {bf / 1e9:,.1f} GFLOP/s, fp32 {fp / 1e9:,.1f} GFLOP/s ({fp / bf:.1f}x)\n")
    print("| size | N | fp32 step ms | bf16 autocast step ms | fp32 speed-up (median) |")
    print("|---|---:|---:|---:|---:|")
    for label in args.sizes:
        cfg, rows = model_config(label)
        g = torch.Generator().manual_seed(0)
        batch = tuple(torch.randint(0, cfg.vocab_size, (rows, 256), generator=g) for _ in range(2))
        steps = {"fp32": make_step(cfg, batch, False), "bf16": make_step(cfg, batch, True)}
        for step in steps.values():
            step()
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                t = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[name].append((time.perf_counter() - t) / args.steps)
        ratio = statistics.median(b / f for b, f in zip(times["bf16"], times["fp32"]))
        print(f"| {label} | {count_params(cfg)['N']:,} | {min(times['fp32']) * 1e3:,.1f} | {min(times['bf16']) * 1e3:,.1f} | {ratio:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
