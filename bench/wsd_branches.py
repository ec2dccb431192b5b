"""WSD branches vs independent runs, and 1 worker vs every core, on the quickstart's recipe at small scale.

Sweeps of one grid (the quickstart's family and lr/batch rules, smaller sizes and budgets):
  A. mode wsd, 1 worker x 1 thread (--one-worker)   B. mode wsd, default workers (one per usable core) x 1 thread
  C1-C3. mode independent (each (N, D) from scratch), each one change further from the branches: C1 its own
     warm-up (5% of its steps), C2 also lr and batch from the rules at its own D, C3 also a cosine schedule.
A vs B: same runs table (losses identical) and the wall-time ratio; B vs C: branch loss vs independent loss per
(N, D), and the FLOPs (exact, from sweep.json) and train seconds each mode spent. (The independent run with
every setting of the branch, warm-up included, equals the branch to the bit: tests/test_law_wsd.py.)

    python bench/wsd_branches.py --data DATA_DIR --out /tmp/wsd_bench   (DATA_DIR: a 1024-token prepared set,
                                                                        e.g. a quickstart's OUT/data)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steplab.law.sweep import auto_workers, run_sweep  # noqa: E402
from steplab.law.tables import load_table  # noqa: E402
from steplab.quickstart import FAMILY, HPARAMS, SEQ_LEN  # noqa: E402


def grid(mode: str, widths, tokens, **extra) -> dict:
    g = {"sizes": [{"d_model": d, **FAMILY} for d in widths], "tokens": tokens, "lr": ["steplaw"],
         "batch_tokens": ["steplaw"], "hparams": HPARAMS, "mode": mode, "eval_tokens": 65_536,
         "fixed": {"data": {"seq_len": SEQ_LEN}, "model": {"max_seq_len": SEQ_LEN},
                   "train": {"device": "cpu", "min_lr_ratio": 0.0, **extra.pop("train", {})}}}
    return {**g, **extra}


def sweep(g: dict, out: Path, data: str, workers: int) -> tuple[float, dict, float]:
    t = time.time()
    run_sweep(g, out, data_path=data, workers=workers, threads=1, progress=False)
    wall = time.time() - t
    cost = json.loads((out / "sweep.json").read_text())["cost"]
    seconds = sum(json.loads(p.read_text())["train_seconds"] for p in out.glob("runs/*/summary.json"))
    return wall, cost, seconds


def rows(out: Path) -> dict:
    """{(N, target D): row} (pairs by the grid's target D: batches differ, so D rounds differently)."""
    return {(r["N"], r["tokens_target"]): r for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines())}


def compare(name: str, wsd: dict, other: dict) -> None:
    print(f"\n### branch vs {name}\n")
    print("| N | D target | WSD branch: D, lr, batch, warmup | loss | independent: D, lr, batch, warmup | loss | branch / independent - 1 |")
    print("|---|---|---|---|---|---|---|")
    diffs = []
    for key in sorted(wsd):
        x, y = wsd[key], other.get(key)
        if y is None:
            continue
        d = x["loss"] / y["loss"] - 1
        diffs.append(d)
        print(f"| {key[0]:,} | {key[1]:,.0f} | {x['D']:,}, {x['lr']:.3g}, {x['batch_tokens']:,}, {x['warmup']} | {x['loss']:.4f} | "
              f"{y['D']:,}, {y['lr']:.3g}, {y['batch_tokens']:,}, {y['warmup']} | {y['loss']:.4f} | {d:+.2%} |")
    a = np.abs(diffs)
    print(f"\n{len(a)} pairs: mean |diff| {a.mean():.2%}, max {a.max():.2%}, mean signed {np.mean(diffs):+.2%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--widths", type=int, nargs="+", default=[24, 32])
    ap.add_argument("--tokens", type=int, nargs="+", default=[100_000, 200_000, 400_000])
    ap.add_argument("--one-worker", action="store_true", help="also time the wsd sweep on 1 worker (A vs B)")
    ap.add_argument("--variants", nargs="+", default=["ind_warmup", "ind_rule", "ind_cosine"],
                    help="independent recipes to compare (C1-C3)")
    args = ap.parse_args()
    out = Path(args.out)
    workers = auto_workers(99)
    print(f"load average at start: {os.getloadavg()}; usable cores {len(os.sched_getaffinity(0))}")
    b = sweep(grid("wsd", args.widths, args.tokens), out / "wsd_default", args.data, workers)
    if args.one_worker:
        a = sweep(grid("wsd", args.widths, args.tokens), out / "wsd_1worker", args.data, 1)
        ta, tb = (load_table(out / name / "runs.csv", adapter="runs") for name in ("wsd_1worker", "wsd_default"))
        same = list(ta["label"]) == list(tb["label"]) and np.array_equal(ta["loss"], tb["loss"])
        print(f"\nwsd sweep, 1 worker: wall {a[0]:.0f} s; default ({workers} workers x 1 thread): wall {b[0]:.0f} s "
              f"-> {a[0] / b[0]:.2f}x faster; runs tables identical: {same}")
    # the independent recipes, each one change away from the branches: warm-up (5% of each run's own steps),
    # then also the lr and batch rules at each run's own D, then also the cosine schedule (the pre-WSD recipe)
    wsd_runs = rows(out / "wsd_default")
    cfgs = {k: json.loads((out / "wsd_default" / "runs" / r["run"] / "config.json").read_text()) for k, r in wsd_runs.items()}
    for k, r in wsd_runs.items():
        r["warmup"] = cfgs[k]["train"]["warmup_steps"]
    wsd_train = {"schedule": "wsd", "decay_fraction": 0.2}
    variants = [("independent WSD, the branches' lr and batch, own warm-up", "ind_warmup",
                 dict(train=wsd_train, rule_tokens=max(args.tokens))),
                ("independent WSD, lr, batch and warm-up of its own D (the planned run's recipe)", "ind_rule",
                 dict(train=wsd_train)),
                ("independent cosine, lr, batch and warm-up of its own D (the pre-WSD recipe)", "ind_cosine", {})]
    c = None
    for name, sub, extra in [v for v in variants if v[1] in args.variants]:
        c = sweep(grid("independent", args.widths, args.tokens, **extra), out / sub, args.data, workers)
        other = rows(out / sub)
        for k, r in other.items():
            r["warmup"] = json.loads((out / sub / "runs" / r["run"] / "config.json").read_text())["train"]["warmup_steps"]
        compare(name, wsd_runs, other)
    print(f"load average at end: {os.getloadavg()}")
    print(f"\nFLOPs: wsd {b[1]['flops']:.3g} vs independent {c[1]['flops']:.3g} -> {c[1]['flops'] / b[1]['flops']:.2f}x saved "
          f"(exact; sweep.json's flops_if_independent for the wsd grid: {b[1]['flops_if_independent']:.3g})")
    print(f"train seconds summed over runs: wsd {b[2]:.0f} s vs independent {c[2]:.0f} s -> {c[2] / b[2]:.2f}x; "
          f"sweep wall: wsd {b[0]:.0f} s vs independent {c[0]:.0f} s -> {c[0] / b[0]:.2f}x")


if __name__ == "__main__":
    main()
