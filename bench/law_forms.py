"""Chinchilla vs Farseer vs Kaplan: extrapolation error with the largest-compute runs held out, on our sweeps and on
public scaling tables (../shared/data/scaling_laws, each with SOURCE.txt; the tables stay there).

For each table: keep one data distribution, take the best loss per (N, D) cell, hold out the K runs of
largest compute (K = 20% of the runs, at least 2), fit each form on the rest with bootstrap intervals, and
report the mean and max |relative error| on the held-out runs and how many fell inside their 95% interval.

    python bench/law_forms.py [--ours RUNS.CSV ...] [--bootstrap 100]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steplab.errors import FitError  # noqa: E402
from steplab.law.fit import FitWarning, fit_parametric  # noqa: E402
from steplab.law.farseer import fit_farseer  # noqa: E402
from steplab.law.kaplan import fit_kaplan  # noqa: E402
from steplab.law.tables import best_per_cell, load_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "scaling_laws"  # the checkout's ../shared (design.md)
PUBLIC = [  # (name, file, where)
    ("gadre c4_original (over-training: D varies at fixed N)", "gadre_overtraining/gadre_models_flat.csv", {"dataset": "c4_original"}),
    ("gadre rpj", "gadre_overtraining/gadre_models_flat.csv", {"dataset": "rpj"}),
    ("misfitting (Li et al. 2025), last checkpoints", "misfitting/scaling_results_last_ckpt_only.csv", {}),
    ("steplaw dense (best lr/bs per cell)", "steplaw/dense_lr_bs_loss.csv", {}),
    ("Epoch's Chinchilla (open_athena)", "open_athena_isoflops/isoflops_transform.csv",
     {"source": "epochai_chinchilla"}),
]


def compare(table, name: str, n_bootstrap: int, seed: int = 0) -> list[dict]:
    table, _ = best_per_cell(table)
    N, D, L = table["N"], table["D"], table["loss"]
    k = max(2, round(0.2 * len(N)))
    out = []
    for form, fit_form in (("chinchilla", fit_parametric), ("farseer", fit_farseer), ("kaplan", fit_kaplan)):
        t = time.time()
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore", FitWarning)
                warnings.simplefilter("ignore", RuntimeWarning)
                fit = fit_form(N, D, L, holdout=k, seed=seed, n_bootstrap=n_bootstrap)
        except FitError as e:
            out.append({"table": name, "form": form, "error": str(e)})
            continue
        errs = np.array([h["rel_err"] for h in fit.holdout])
        inside = sum(h["predicted_ci"][0] <= h["measured"] <= h["predicted_ci"][1] for h in fit.holdout)
        out.append({"table": name, "form": form, "runs": len(N), "held": k, "fit_rmse": fit.rmse_log,
                    "mean_abs": float(np.mean(np.abs(errs))), "max_abs": float(np.max(np.abs(errs))),
                    "bias": float(np.mean(errs)), "inside": inside, "seconds": time.time() - t})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ours", nargs="*", default=[], help="our sweep runs.csv files")
    ap.add_argument("--bootstrap", type=int, default=100)
    ap.add_argument("--shared", type=Path, default=SHARED, help=f"the public tables (default {SHARED})")
    args = ap.parse_args()
    shared = args.shared
    tables = [(f"ours: {p}", load_table(p, adapter="runs")) for p in args.ours]
    if shared.is_dir():
        for name, rel, where in PUBLIC:
            tables.append((name, load_table(shared / rel, where=where)))
    else:
        print(f"(no {shared}: public tables skipped; pass --shared DIR)")
    rows = []
    for name, t in tables:
        rows += compare(t, name, args.bootstrap)
        print(f"  done: {name}", flush=True)
    print("| table | form | runs | held out | fit RMSE (log) | mean abs err | max abs err | mean err | inside 95% CI |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['table']} | {r['form']} | | | | not fitted: {r['error']} | | | |")
        else:
            pct = (lambda x, sign="": f"{x:{sign}.2%}" if abs(x) < 10 else "diverges")  # > 1000% off: a runaway fit
            print(f"| {r['table']} | {r['form']} | {r['runs']} | {r['held']} | {r['fit_rmse']:.4f} | {pct(r['mean_abs'])} | "
                  f"{pct(r['max_abs'])} | {pct(r['bias'], '+')} | {r['inside']}/{r['held']} |")


if __name__ == "__main__":
    main()
