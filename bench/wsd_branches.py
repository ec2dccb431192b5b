"""WSD branches vs independent runs, and 1 worker vs every core, on the quickstart's recipe at small scale.

Three sweeps of one grid (the quickstart's family and lr/batch rules, smaller sizes and budgets):
  A. mode wsd, 1 worker x 1 thread      B. mode wsd, default workers (one per usable core) x 1 thread
  C. mode independent (each (N, D) trained from scratch with its own Step Law lr/batch and cosine), default workers
A vs B: same runs table (losses identical) and the wall-time ratio; B vs C: branch loss vs independent loss per
(N, D), and the FLOPs (exact, from sweep.json) and train seconds each mode spent.

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


def grid(mode: str, widths, tokens) -> dict:
    return {"sizes": [{"d_model": d, **FAMILY} for d in widths], "tokens": tokens, "lr": ["steplaw"],
            "batch_tokens": ["steplaw"], "hparams": HPARAMS, "mode": mode, "eval_tokens": 65_536,
            "fixed": {"data": {"seq_len": SEQ_LEN}, "model": {"max_seq_len": SEQ_LEN},
                      "train": {"device": "cpu", "min_lr_ratio": 0.0}}}


def sweep(g: dict, out: Path, data: str, workers: int) -> tuple[float, dict, float]:
    t = time.time()
    run_sweep(g, out, data_path=data, workers=workers, threads=1, progress=False)
    wall = time.time() - t
    cost = json.loads((out / "sweep.json").read_text())["cost"]
    seconds = sum(json.loads(p.read_text())["train_seconds"] for p in out.glob("runs/*/summary.json"))
    return wall, cost, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--widths", type=int, nargs="+", default=[24, 32])
    ap.add_argument("--tokens", type=int, nargs="+", default=[100_000, 200_000, 400_000])
    args = ap.parse_args()
    out = Path(args.out)
    print(f"load average at start: {os.getloadavg()}; usable cores {len(os.sched_getaffinity(0))}")
    a = sweep(grid("wsd", args.widths, args.tokens), out / "wsd_1worker", args.data, 1)
    b = sweep(grid("wsd", args.widths, args.tokens), out / "wsd_default", args.data, auto_workers(99))
    c = sweep(grid("independent", args.widths, args.tokens), out / "independent", args.data, auto_workers(99))
    print(f"load average at end: {os.getloadavg()}")
    ta, tb = (load_table(out / name / "runs.csv", adapter="runs") for name in ("wsd_1worker", "wsd_default"))
    same = list(ta["label"]) == list(tb["label"]) and np.array_equal(ta["loss"], tb["loss"])
    print(f"\nwsd sweep, 1 worker: wall {a[0]:.0f} s; default ({auto_workers(99)} workers x 1 thread): wall {b[0]:.0f} s "
          f"-> {a[0] / b[0]:.2f}x faster; runs tables identical: {same}")
    # pair by the grid's target D: a branch's batch (the largest budget's) rounds D differently
    rows = {name: {(r["N"], r["tokens_target"]): r for r in map(json.loads, (out / name / "runs.jsonl").read_text().splitlines())}
            for name in ("wsd_default", "independent")}
    print("\n| N | D target | WSD branch: D, lr, batch | loss | independent: D, lr, batch | loss | branch / independent - 1 |")
    print("|---|---|---|---|---|---|---|")
    diffs = []
    for key in sorted(rows["wsd_default"]):
        x, y = rows["wsd_default"][key], rows["independent"].get(key)
        if y is None:
            continue
        d = x["loss"] / y["loss"] - 1
        diffs.append(d)
        print(f"| {key[0]:,} | {key[1]:,.0f} | {x['D']:,}, {x['lr']:.3g}, {x['batch_tokens']:,} | {x['loss']:.4f} | "
              f"{y['D']:,}, {y['lr']:.3g}, {y['batch_tokens']:,} | {y['loss']:.4f} | {d:+.2%} |")
    diffs = np.abs(diffs)
    print(f"\n{len(diffs)} pairs: mean |diff| {diffs.mean():.2%}, max {diffs.max():.2%}")
    print(f"FLOPs: wsd {b[1]['flops']:.3g} vs independent {c[1]['flops']:.3g} -> {c[1]['flops'] / b[1]['flops']:.2f}x saved "
          f"(exact; sweep.json's flops_if_independent for the wsd grid: {b[1]['flops_if_independent']:.3g})")
    print(f"train seconds summed over runs: wsd {b[2]:.0f} s vs independent {c[2]:.0f} s -> {c[2] / b[2]:.2f}x; "
          f"sweep wall: wsd {b[0]:.0f} s vs independent {c[0]:.0f} s -> {c[0] / b[0]:.2f}x")


if __name__ == "__main__":
    main()
