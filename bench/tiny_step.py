"""Quickstart-sized training steps, old vs new, side by side in one process (issue 13).

    python bench/tiny_step.py [--sizes 33k 221k 0.9m] [--threads 1] [--rounds 5] [--steps 4]
    python bench/tiny_step.py --data DATA_DIR --train-steps 400 [--train-sizes 33k 0.9m]  # + fixed-seed runs

Contenders per size (the quickstart's family: 2 layers, 2 heads, vocab 1024, batch 9 x 256 tokens, bf16 autocast,
fused AdamW, gradient clipping, ``loss.item()`` every step: the trainer's step):

- ``old``: eager, attention under bf16 autocast (the code before 2026-11-30: ``FP32_ATTENTION_MAX_HEAD_DIM = 0``);
- ``new eager``: attention in fp32 at head dims <= ``FP32_ATTENTION_MAX_HEAD_DIM`` (models/common.py);
- ``new compiled``: the same under ``torch.compile`` (what ``train.compile=auto`` picks for long runs).

Rounds are interleaved so background load hits every contender alike; the best round of each is reported with
the median of the per-round ratios. The compiled contender's first step is timed separately: ``compile cold`` in a
fresh inductor cache (this script points TORCHINDUCTOR_CACHE_DIR at a new temporary directory unless it is set),
each in a fresh Python process (what a sweep worker's first run of a size pays: imports, tracing, C++ builds),
``compile warm`` in another fresh process over the same cache (a later run of that shape; within one process a
second model of the same shape reuses the compiled code outright); ``break-even`` = cold compile / (new eager -
new compiled) per step.

``--train-steps N`` also trains one fixed-seed run per size through ``steplab.train.trainer.train`` twice, old
(eager, autocast attention) and new (``train.compile`` forced to what the bench measures: true), on ``--data``,
and prints both final validation losses: the "equal results" check.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # a cold compile, unless the caller chose a cache
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="tiny-step-inductor-")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import steplab.models.common as common  # noqa: E402
from steplab.config import ModelConfig, RunConfig  # noqa: E402
from steplab.models.dense import Step1, count_params  # noqa: E402

SIZES = {"33k": 32, "221k": 96, "0.9m": 192}  # label -> d_model (2 layers, 2 heads: the quickstart's family)
LR = {"33k": 6.3e-3, "221k": 4.62e-3, "0.9m": 3.68e-3}  # the quickstart's lr rule at D = 2M (its sweep and plan)
NEW_MAX_HEAD_DIM = common.FP32_ATTENTION_MAX_HEAD_DIM


class attention_limit:
    """Run with ``FP32_ATTENTION_MAX_HEAD_DIM`` set to ``value`` (0: the old path), then restore it."""

    def __init__(self, value: int):
        self.value = value

    def __enter__(self):
        self.saved, common.FP32_ATTENTION_MAX_HEAD_DIM = common.FP32_ATTENTION_MAX_HEAD_DIM, self.value

    def __exit__(self, *exc):
        common.FP32_ATTENTION_MAX_HEAD_DIM = self.saved


def make_step(d_model: int, compiled: bool, limit: int, batch):
    cfg = ModelConfig(vocab_size=1024, d_model=d_model, n_layer=2, n_head=2, max_seq_len=256)
    torch.manual_seed(0)
    model = Step1(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    fn = torch.compile(model) if compiled else model

    def step() -> float:
        with attention_limit(limit):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = fn(*batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def compile_seconds(d_model: int, cache: str) -> float:
    """Seconds of the first compiled step of a fresh Python process (inductor cache ``cache``)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    out = subprocess.run([sys.executable, __file__, "--first-compiled-step", str(d_model), "--threads", str(torch.get_num_threads())],
                         env=env, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_size(label: str, args) -> dict:
    d = SIZES[label]
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 1024, (9, 256), generator=g), torch.randint(0, 1024, (9, 256), generator=g))
    steps = {"old": make_step(d, False, 0, batch), "new eager": make_step(d, False, NEW_MAX_HEAD_DIM, batch),
             "new compiled": make_step(d, True, NEW_MAX_HEAD_DIM, batch)}
    cache = tempfile.mkdtemp(prefix="tiny-step-inductor-")
    cold, warm = compile_seconds(d, cache), compile_seconds(d, cache)
    for step in steps.values():
        step(), step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(timed(lambda: [step() for _ in range(args.steps)]) / args.steps)
    best = {k: min(v) for k, v in times.items()}
    ratio = {k: statistics.median(o / n for o, n in zip(times["old"], v)) for k, v in times.items()}
    saving = best["new eager"] - best["new compiled"]
    return {"label": label, "N": count_params(ModelConfig(vocab_size=1024, d_model=d, n_layer=2, n_head=2))["N"],
            "best": best, "ratio": ratio, "cold": cold, "warm": warm,
            "break_even": cold / saving if saving > 0 else float("inf"), "load": os.getloadavg()[0]}


def train_pair(label: str, args) -> dict:
    """One fixed-seed run, old vs new, through the trainer; final val loss of each."""
    from steplab.train.trainer import train

    out = {}
    for name, limit, compile_ in (("old", 0, "false"), ("new", NEW_MAX_HEAD_DIM, "true")):
        raw = {"model": {"d_model": SIZES[label], "n_layer": 2, "n_head": 2, "max_seq_len": 256, "vocab_size": 0},
               "data": {"path": args.data, "seq_len": 256},
               "train": {"batch_size": 9, "max_steps": args.train_steps, "warmup_steps": max(1, args.train_steps // 20),
                         "schedule": "wsd", "min_lr_ratio": 0.0, "lr": LR[label], "eval_every": args.train_steps,
                         "eval_batches": 16, "ckpt_every": args.train_steps, "threads": args.threads, "device": "cpu",
                         "dtype": "bf16", "compile": compile_, "seed": 0}}
        with tempfile.TemporaryDirectory() as tmp, attention_limit(limit):
            t = time.perf_counter()
            s = train(RunConfig.from_dict(raw), Path(tmp) / name, progress=False)
            out[name] = {"val_loss": s["val_loss"], "wall": time.perf_counter() - t, "tok_s": s["tok_per_s"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="steps per timed round")
    ap.add_argument("--data", help="a prepared dataset (steplab data prepare), for --train-steps")
    ap.add_argument("--train-steps", type=int, default=0)
    ap.add_argument("--train-sizes", nargs="+", choices=list(SIZES), help="sizes for --train-steps (default: --sizes)")
    ap.add_argument("--fp32-attention-max-head-dim", type=int, default=NEW_MAX_HEAD_DIM, help="the new path's limit")
    ap.add_argument("--first-compiled-step", type=int, default=0, help=argparse.SUPPRESS)  # internal: d_model
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    globals()["NEW_MAX_HEAD_DIM"] = args.fp32_attention_max_head_dim
    if args.first_compiled_step:
        batch = (torch.zeros(9, 256, dtype=torch.long), torch.zeros(9, 256, dtype=torch.long))
        t = time.perf_counter()  # imports of the compiler stack count: a fresh worker pays them
        step = make_step(args.first_compiled_step, True, NEW_MAX_HEAD_DIM, batch)
        step()
        print(time.perf_counter() - t)
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f}, "
          f"fp32 attention up to head dim {NEW_MAX_HEAD_DIM}, inductor cache {os.environ['TORCHINDUCTOR_CACHE_DIR']}")
    print("\n| size | N | head dim | old ms/step | new eager ms/step | new compiled ms/step | new eager / old "
          "| new compiled / old | compile cold s | compile warm s | break-even steps (cold) | load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label in args.sizes:
        r = bench_size(label, args)
        b, q = r["best"], r["ratio"]
        print(f"| {label} | {r['N']:,} | {SIZES[label] // 2} | {b['old'] * 1e3:.1f} | {b['new eager'] * 1e3:.1f} | "
              f"{b['new compiled'] * 1e3:.1f} | {q['new eager']:.2f}x | {q['new compiled']:.2f}x | {r['cold']:.1f} | "
              f"{r['warm']:.1f} | {r['break_even']:.0f} | {r['load']:.2f} |", flush=True)
    if args.train_steps:
        if not args.data:
            ap.error("--train-steps needs --data")
        print("\n| size | steps | old val loss | new val loss | new / old - 1 | old tok/s | new tok/s (incl. compile) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label in args.train_sizes or args.sizes:
            r = train_pair(label, args)
            o, n = r["old"], r["new"]
            print(f"| {label} | {args.train_steps} | {o['val_loss']:.4f} | {n['val_loss']:.4f} | "
                  f"{n['val_loss'] / o['val_loss'] - 1:+.2%} | {o['tok_s']:,.0f} | {n['tok_s']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
