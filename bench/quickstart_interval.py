"""How wide must the quickstart's one-run interval be? Two laws and three interval methods on finished quickstarts.

Issue 12 asks for a prediction within 1.5% and a 95% interval no wider than +-3%. This bench reads quickstart
output directories (each: ``sweep/runs.csv``, ``run/summary.json``, ``prediction.json``) and, per directory and
law, prints the planned run's prediction error and three 95% intervals for it:

- ``case``: bootstrap over the sweep's runs (what the quickstart uses), times a run's scatter around the law;
- ``resid``: a fixed-design bootstrap: refits on fitted * exp(resampled residuals), each draw's prediction times
  one more resampled residual (the new run's own scatter); the sweep's sizes and budgets are chosen, not
  sampled, so this is the textbook bootstrap for a designed experiment;
- ``delta``: the delta method (Kaplan only: its exact Jacobian), s^2 (J'J)^-1 for the law plus s^2 for the run.

Laws: the quickstart's (Chinchilla's E + A/N^alpha + B/D^beta on non-embedding N) and Kaplan's on total
parameters (embeddings included, Chinchilla's own convention; at 13.8k non-embedding parameters the tied
embedding is 49k more). Then a backtest of the same 4x extrapolation inside each sweep: fit on the sizes up to
the largest / 4 and predict the largest size's runs, so the interval's width can be judged against errors the
law actually makes at that distance.

    python bench/quickstart_interval.py /tmp/qs8/seed0 /tmp/qs8/seed1 /tmp/qs8/seed2
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steplab.law.fit import fit_parametric  # noqa: E402
from steplab.law.kaplan import _jacobian, fit_kaplan  # noqa: E402

Z = 1.959964


def load(qs: Path) -> dict:
    rows = list(csv.DictReader(open(qs / "sweep" / "runs.csv")))
    col = lambda k: np.array([float(r[k]) for r in rows])  # noqa: E731
    summary = json.loads((qs / "run" / "summary.json").read_text())
    return {"N": col("N"), "N_total": col("params_total"), "D": col("D"), "L": col("loss"),
            "plan_N": summary["N"], "plan_N_total": summary["params_total"], "plan_D": summary["D"],
            "measured": json.loads((qs / "prediction.json").read_text())["measured_loss"]}


LAWS = {  # name: (fit function, which N column)
    "chinchilla, non-embedding N (quickstart)": (lambda N, D, L, nb: fit_parametric(N, D, L, n_bootstrap=nb, n_starts=16), ""),
    "kaplan, total N": (lambda N, D, L, nb: fit_kaplan(N, D, L, n_bootstrap=nb), "_total"),
}


def resid_interval(fit_fn, N, D, L, Np, Dp, n: int, seed: int = 0) -> tuple[float, float]:
    base = fit_fn(N, D, L, 0)
    fitted = base.predict(N, D)
    r = np.log(L / fitted)
    r = r * np.sqrt(len(r) / max(1, len(r) - 5))  # residuals understate the scatter by the fitted parameters
    rng = np.random.default_rng(seed)
    draws = [float(fit_fn(N, D, fitted * np.exp(rng.choice(r, len(r))), 0).predict(Np, Dp)) * np.exp(rng.choice(r))
             for _ in range(n)]
    return tuple(np.percentile(draws, [2.5, 97.5]))


def delta_halfwidth(fit, N, D, L, Np, Dp) -> np.ndarray:
    """Kaplan: half-width in log loss of the one-run interval, Z * sqrt(g' Cov g + s^2)."""
    lN, lD, lL = np.log(N), np.log(D), np.log(L)
    J = _jacobian(fit.params, lN, lD, lL)
    r = np.log(fit.predict(N, D)) - lL
    s2 = float(r @ r) / (len(r) - len(fit.params))
    g = _jacobian(fit.params, np.log(np.atleast_1d(Np)), np.log(np.atleast_1d(Dp)), None)
    var = np.einsum("ti,ij,tj->t", g, s2 * np.linalg.pinv(J.T @ J), g)
    return Z * np.sqrt(var + s2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="quickstart output directories")
    ap.add_argument("--bootstrap", type=int, default=200)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    np.seterr(all="ignore")
    for qs in args.dirs:
        d = load(qs)
        print(f"\n{qs}: measured {d['measured']:.4f}")
        for name, (fit_fn, k) in LAWS.items():
            N, Np = d["N" + k], d["plan_N" + k]
            fit = fit_fn(N, d["D"], d["L"], args.bootstrap)
            p = float(fit.predict(Np, d["plan_D"]))
            lo, hi = fit.predict_run_interval(np.array([Np]), np.array([d["plan_D"]]))
            rlo, rhi = resid_interval(fit_fn, N, d["D"], d["L"], Np, d["plan_D"], args.bootstrap)
            line = (f"  {name}: predicted {p:.4f}, error {p / d['measured'] - 1:+.2%}, RMSE {fit.rmse_log:.2%}; "
                    f"one-run 95%: case [{lo[0] / p - 1:+.1%}, {hi[0] / p - 1:+.1%}], "
                    f"resid [{rlo / p - 1:+.1%}, {rhi / p - 1:+.1%}]")
            if k:
                h = float(delta_halfwidth(fit, N, d["D"], d["L"], Np, d["plan_D"])[0])
                line += f", delta +-{np.expm1(h):.1%}"
            print(line)
            sizes = np.unique(d["N"])  # the same runs for both laws: by non-embedding N, as the plan's 4x is
            small, big = d["N"] <= sizes[-1] / 3.9, d["N"] == sizes[-1]
            if len(np.unique(d["N"][small])) >= 2:
                back = fit_fn(N[small], d["D"][small], d["L"][small], 0)
                err = back.predict(N[big], d["D"][big]) / d["L"][big] - 1
                print(f"    backtest (non-embedding sizes <= {sizes[-1] / 4:,.0f} -> {sizes[-1]:,.0f}, 4x): errors "
                      + " ".join(f"{e:+.2%}" for e in err))


if __name__ == "__main__":
    main()
