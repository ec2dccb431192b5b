"""The quickstart's downstream phase, timed: the suite over a finished quickstart's sweep and planned run.

    PYTHONPATH=. python bench/downstream_suite.py QUICKSTART_DIR [--workers N] [--out DIR]

Copies the sweep's law runs and the planned run (without their saved suite results) to --out (default a
temporary directory), scores them as ``steplab quickstart`` does (``suite_over_sweep``, the planned run on all
items, the sweep runs on a fifth, ``--workers`` processes), and prints the wall time and, when the source
directory holds saved results, whether every task's item and correct counts are the same as there.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def counts(root: Path) -> dict:
    out = {}
    for f in sorted(root.glob("sweep/runs/*/eval/suite_small.json")) + sorted(root.glob("run/eval/suite_small.json")):
        out[f.parent.parent.name] = {r["task"]: (r["n"], r["correct"]) for r in json.loads(f.read_text())["results"]}
    return out


def main() -> None:
    from steplab.eval.taskfit import suite_over_sweep, sweep_law_runs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("quickstart")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    src = Path(args.quickstart)
    dst = Path(args.out or tempfile.mkdtemp(prefix="steplab-downstream-"))
    ignore = shutil.ignore_patterns("eval")
    for d in sweep_law_runs(src / "sweep"):
        shutil.copytree(d, dst / "sweep" / "runs" / d.name, ignore=ignore, dirs_exist_ok=True)
    shutil.copytree(src / "run", dst / "run", ignore=ignore, dirs_exist_ok=True)
    t = time.time()
    suite_over_sweep(sweep_law_runs(dst / "sweep"), dst / "run", dst, progress=False, workers=args.workers)
    wall = time.time() - t
    before, after = counts(src), counts(dst)
    same = "no saved results to compare" if not before else ("identical" if before == after else "DIFFERENT")
    print(f"downstream suite: {wall:.1f} s with {args.workers} worker(s), load average {os.getloadavg()[0]:.2f}; "
          f"{len(after)} runs scored; item and correct counts vs {src}: {same}")


if __name__ == "__main__":
    main()
