"""Where a training run's time goes, per model size: torch.profiler over ``steplab.train.trainer.train``.

    python bench/profile_step.py --data DATA_DIR [--sizes 33k 0.9m 25.7m] [--steps 30] [--threads 1]
                                 [--trace-dir /tmp/profile]

Each size trains ``--steps`` steps of the quickstart's recipe (bf16 autocast, AdamW fused, Step Law batch of
the quickstart's largest budget: 9 x 256 tokens; step1-mini: its preset's batch) with one evaluation and one
checkpoint at the end, as a sweep run does, all under the profiler. Printed per size: the wall time, the
profiled operators' self CPU time grouped (matmuls, attention, norms and activations, loss, optimizer,
data and copies, checkpoint, evaluation) and the part no operator accounts for (Python and framework overhead,
host syncs), then the top operators by self CPU time. A Chrome trace per size goes to ``--trace-dir``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steplab.config import RunConfig, preset  # noqa: E402
import steplab.train.trainer as trainer  # noqa: E402

SIZES = {  # label -> model overrides (the quickstart family: 2 layers, 2 heads) or a preset
    "33k": {"d_model": 32, "n_layer": 2, "n_head": 2},
    "0.9m": {"d_model": 192, "n_layer": 2, "n_head": 2},
    "25.7m": "step1-mini",
}
GROUPS = [  # (group, substrings of operator names), first match wins
    ("optimizer", ("adam", "optimizer", "clip_grad", "_foreach", "norm_")),
    ("loss", ("cross_entropy", "nll_loss", "log_softmax")),
    ("attention", ("scaled_dot_product", "attention", "_flash", "softmax")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn", "onednn")),
    ("norms + activations + rope", ("rms_norm", "silu", "aten::mul", "aten::add", "aten::rsqrt", "aten::pow",
                                    "aten::mean", "aten::neg", "aten::cat", "aten::sigmoid", "embedding")),
    ("data + copies + casts", ("aten::copy_", "aten::to", "_to_copy", "aten::index", "from_numpy", "contiguous",
                               "aten::clone", "aten::empty", "aten::zero", "aten::fill")),
]


def config(size, data: str, steps: int, threads: int) -> RunConfig:
    if isinstance(size, str):
        raw = preset(size).to_dict()
        raw["train"].update(batch_size=4)  # one step of a 25.7M model at 4 x 512 tokens is seconds on 1 core
    else:
        raw = {"model": {**size, "max_seq_len": 256}, "data": {"seq_len": 256}, "train": {"batch_size": 9}}
    raw.setdefault("data", {})["path"] = data
    raw["model"]["vocab_size"] = 0
    raw["train"].update(max_steps=steps, warmup_steps=2, eval_every=steps, eval_batches=4, ckpt_every=steps,
                        log_every=1, threads=threads, device="cpu", dtype="bf16", compile=False, lr=3e-3)
    return RunConfig.from_dict(raw)


def group_of(name: str) -> str:
    low = name.lower()
    for g, keys in GROUPS:
        if any(k.lower() in low for k in keys):
            return g
    return "other operators"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trace-dir", default="/tmp/steplab-profile")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
    # label the trainer's evaluation and checkpoint calls, so their operators group under them
    for fn in ("evaluate", "save_checkpoint"):
        orig = getattr(trainer, fn)

        def wrapped(*a, _orig=orig, _name=fn, **k):
            with record_function(f"#{_name}"):
                return _orig(*a, **k)
        setattr(trainer, fn, wrapped)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f}")
    for label in args.sizes:
        cfg = config(SIZES[label], args.data, args.steps, args.threads)
        tmp = Path(tempfile.mkdtemp(prefix="profile-"))
        try:
            trainer.train(config(SIZES[label], args.data, 2, args.threads), tmp / "warm", progress=False)  # warm-up
            t = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                s = trainer.train(cfg, tmp / "run", progress=False)
            wall = time.perf_counter() - t
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        prof.export_chrome_trace(str(Path(args.trace_dir) / f"train_{label}.json"))
        events = prof.key_averages()
        groups: dict[str, float] = defaultdict(float)  # self CPU time (us) of every operator, by group
        for e in events:
            if not e.key.startswith("#") and not e.key.startswith("ProfilerStep"):
                groups[group_of(e.key)] += e.self_cpu_time_total
        within = {e.key[1:]: e.cpu_time_total for e in events if e.key.startswith("#")}  # eval, checkpoint totals
        wall_us = wall * 1e6
        print(f"\n### {label}: N {s['N']:,}, {s['batch_tokens']:,} tokens/step, {args.steps} steps, wall {wall:.2f} s "
              f"({wall / args.steps * 1000:.1f} ms/step incl. eval and checkpoint), {s['tok_per_s']:,.0f} tok/s, "
              f"MFU {s['mfu']:.1%}\n")
        print("| where (operators' self CPU time) | ms | share of wall |")
        print("|---|---:|---:|")
        for g, v in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"| {g} | {v / 1000:,.0f} | {v / wall_us:.1%} |")
        rest = max(0.0, wall_us - sum(groups.values()))
        print(f"| no operator (Python, framework overhead, host syncs) | {rest / 1000:,.0f} | {rest / wall_us:.1%} |")
        print("| *of the above, inside " + " / ".join(within) + " (total)* | "
              + " / ".join(f"{v / 1000:,.0f}" for v in within.values()) + " | "
              + " / ".join(f"{v / wall_us:.1%}" for v in within.values()) + " |")
        print(f"\ntop {args.top} operators by self CPU time:\n")
        print("```")
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))
        print("```", flush=True)


if __name__ == "__main__":
    main()
