"""Hold out whole sizes instead of the largest-compute runs: fit L(N, D) on the runs below ``--below`` and
predict the rest (no training; reads a runs table, e.g. bench/results/predictable_scale/runs.csv).

    python bench/holdout_by_size.py bench/results/predictable_scale/runs.csv --below 1.6e6

Use it to hold out sizes an lr rule never saw: a size that informed the rule is no test of the law.
"""
from __future__ import annotations

import argparse
import warnings

from steplab.law.fit import FitWarning, fit_parametric
from steplab.law.tables import load_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs")
    ap.add_argument("--below", type=float, required=True, help="fit on runs with N below this; predict the others")
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()
    t = load_table(args.runs, adapter="runs")
    keep = t["N"] < args.below
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        fit = fit_parametric(t["N"][keep], t["D"][keep], t["loss"][keep], n_bootstrap=args.bootstrap, seed=0)
    print(f"fit on {int(keep.sum())} runs with N < {args.below:g}; predicting {int((~keep).sum())}")
    print("| N | D | measured | predicted | error |\n|---|---|---|---|---|")
    for n, d, loss in zip(t["N"][~keep], t["D"][~keep], t["loss"][~keep]):
        p = float(fit.predict(n, d))
        print(f"| {n:,.0f} | {d:,.0f} | {loss:.4f} | {p:.4f} | {p / loss - 1:+.2%} |")


if __name__ == "__main__":
    main()
