"""What the loss laws other than Chinchilla's (Farseer, Kaplan) share: a fitted parameter vector, its bootstrap
draws, predictions with intervals for the law's mean and for one new run, and the JSON form.

A subclass names its parameters (``NAMES``), its formula (``FORM``) and its prediction from a parameter vector
(``_law(params, N, D)``); everything else is here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from steplab.errors import FitError
from steplab.law.fit import check_points, holdout_report, one_run_interval, run_scatter, split_holdout


@dataclass(kw_only=True)
class FormFit:
    params: np.ndarray
    n: int
    rmse_log: float
    max_rel_err: float
    cost: float
    starts: int
    boot: np.ndarray | None = None  # (n_bootstrap, len(NAMES))
    holdout: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    N_is: str = "N"
    kind = "form"  # class attributes, not fields: what a subclass names
    NAMES = ()
    FORM = ""

    def _law(self, params: np.ndarray, N: np.ndarray, D: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict(self, N, D) -> np.ndarray:
        with np.errstate(all="ignore"):
            return self._law(self.params, np.asarray(N, float), np.asarray(D, float))

    def _draws(self, N, D) -> np.ndarray:
        """The law of every bootstrap draw at (N, D): (n_bootstrap, len(N)), non-finite draws as NaN."""
        N, D = np.atleast_1d(np.asarray(N, float)), np.atleast_1d(np.asarray(D, float))
        with np.errstate(all="ignore"):
            draws = np.array([self._law(b, N, D) for b in self.boot])
        draws[~np.isfinite(draws)] = np.nan
        return draws

    def predict_interval(self, N, D, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Bounds on the law's mean (bootstrap percentiles)."""
        if self.boot is None:
            p = np.atleast_1d(self.predict(N, D))
            return p, p
        lo, hi = np.nanpercentile(self._draws(N, D), [50 * (1 - level), 50 * (1 + level)], axis=0)
        return lo, hi

    def run_sigma(self) -> float:
        return run_scatter(self.rmse_log, self.n, len(self.NAMES))

    def predict_run_interval(self, N, D, level: float = 0.95, seed: int = 0, per_draw: int = 20):
        """Interval for ONE new run at (N, D): each bootstrap law times a run's own scatter around it."""
        law = np.atleast_1d(self.predict(N, D))[None, :] if self.boot is None else self._draws(N, D)
        return one_run_interval(law, self.run_sigma(), level, seed, per_draw)

    @classmethod
    def from_solution(cls, best, fit_N, fit_D, fit_L, starts: int, boot, held_N, held_D, held_L, **extra):
        """The fit of solver result ``best`` on the runs it saw (RMSE and worst error from its own predictions),
        with the held-out runs' report."""
        fit = cls(params=best.x, n=len(fit_N), rmse_log=0.0, max_rel_err=0.0, cost=float(best.cost), starts=starts,
                  boot=boot, **extra)
        pred = fit.predict(fit_N, fit_D)
        fit.rmse_log = float(np.sqrt(np.mean((np.log(pred) - np.log(fit_L)) ** 2)))
        fit.max_rel_err = float(np.max(np.abs(pred / fit_L - 1)))
        fit.holdout = holdout_report(fit, held_N, held_D, held_L)
        return fit

    def to_dict(self) -> dict:
        d: dict = {"kind": self.kind, "N_is": self.N_is, "form": self.FORM}
        for i, name in enumerate(self.NAMES):
            d[name] = float(self.params[i])
            if self.boot is not None:
                col = self.boot[:, i][np.isfinite(self.boot[:, i])]
                d[f"{name}_ci"] = [float(x) for x in np.percentile(col, [2.5, 97.5])] if len(col) > 1 else None
        d["quality"] = {"n": self.n, "rmse_log_loss": self.rmse_log, "max_rel_err": self.max_rel_err,
                        "starts": self.starts, "bootstrap": 0 if self.boot is None else len(self.boot)}
        d["holdout"], d["warnings"], d["notes"] = self.holdout, self.warnings, self.notes
        return d


def fit_points(what: str, N, D, loss, holdout: int, min_runs: int, min_levels: int, n_params: int, hint: str = ""):
    """Checked (N, D, loss) and the mask of the ``holdout`` largest-compute runs; a FitError unless the runs left
    to fit number ``min_runs`` over ``min_levels`` sizes and budgets."""
    pts = check_points(what, N=N, D=D, loss=loss)
    N, D, L = pts["N"], pts["D"], pts["loss"]
    held = split_holdout(N, D, holdout, min_runs, f"the {what}")
    fN, fD = N[~held], D[~held]
    sizes, budgets = len(np.unique(fN)), len(np.unique(fD))
    if len(fN) < min_runs or sizes < min_levels or budgets < min_levels:
        raise FitError(f"{what}: {len(fN)} runs, {sizes} sizes, {budgets} budgets; its {n_params} parameters need at "
                       f"least {min_runs} runs over {min_levels} sizes and {min_levels} budgets{hint}")
    return N, D, L, held


def solve_and_bootstrap(solve, starts, arrays: tuple[np.ndarray, ...], n_bootstrap: int, rng: np.random.Generator,
                        what: str, boot_nfev: int):
    """The lowest-cost solution of ``solve(x0, *arrays)`` over ``starts``, and ``n_bootstrap`` refits from it on
    runs resampled with replacement (``solve(best, *resampled, max_nfev=boot_nfev)``): (best, draws or None)."""
    best = None
    for x0 in starts:
        r = solve(x0, *arrays)
        if np.all(np.isfinite(r.x)) and (best is None or r.cost < best.cost):
            best = r
    if best is None:
        raise FitError(f"{what}: the solver failed from every start; check the table for outliers")
    if not n_bootstrap:
        return best, None
    boot = np.empty((n_bootstrap, len(best.x)))
    for i in range(n_bootstrap):
        idx = rng.integers(0, len(arrays[0]), len(arrays[0]))
        boot[i] = solve(best.x, *(a[idx] for a in arrays), max_nfev=boot_nfev).x
    return best, boot
