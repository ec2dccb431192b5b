"""Kaplan et al.'s joint loss law (2020, "Scaling Laws for Neural Language Models", eq. 1.5) next to Chinchilla's.

    L(N, D) = [ (Nc / N)^(alpha_N / alpha_D) + Dc / D ]^alpha_D

Four parameters and no additive floor. Where Chinchilla's form adds the N and D terms (every size gains the
same from more data), Kaplan's composes them: a larger model is further from its data limit at the same D,
so it gains more from more data. Small sweeps on a small corpus show exactly that interaction (the quickstart's
221k-parameter size fell 0.40 nats from 0.5M to 1M tokens where its 13.8k size fell 0.28; docs/LOG.md
2026-12-01), which an additive form can only average away.

Fitted like the others: Huber loss (delta 1e-3) of log residuals, scipy's trust-region least squares with the
exact Jacobian from the best points of a grid of starts, bootstrap over runs for intervals; ``holdout=K`` leaves the K largest-compute runs out.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

from steplab.errors import FitError
from steplab.law.fit import HUBER_DELTA, check_points

NAMES = ("log_Nc", "log_Dc", "alpha_N", "alpha_D")
MIN_RUNS = 6
# A grid of starts (log Nc, log Dc, alpha_N, alpha_D) is scored at once; the solver runs from the best few.
GRID = np.array(list(itertools.product(np.arange(6, 34, 3), np.arange(6, 34, 3), [0.03, 0.07, 0.15, 0.3, 0.6],
                                       [0.03, 0.07, 0.15, 0.3, 0.6])), float)
N_SOLVES = 4


def _log_predict(p: np.ndarray, lN: np.ndarray, lD: np.ndarray) -> np.ndarray:
    lnc, ldc, aN, aD = p
    return aD * np.logaddexp((aN / aD) * (lnc - lN), ldc - lD)


def _residuals(p, lN, lD, lL):
    with np.errstate(all="ignore"):
        r = _log_predict(p, lN, lD) - lL
    return np.where(np.isfinite(r), r, 10.0)


def _jacobian(p, lN, lD, lL):
    """d(log L)/d(params), exact: log L = aD S, S = logaddexp(u, v), u = (aN/aD)(log Nc - log N), v = log Dc - log D."""
    lnc, ldc, aN, aD = p
    with np.errstate(all="ignore"):
        u, v = (aN / aD) * (lnc - lN), ldc - lD
        S = np.logaddexp(u, v)
        wu, wv = np.exp(u - S), np.exp(v - S)
        J = np.stack([aN * wu, aD * wv, wu * (lnc - lN), S - wu * u], axis=1)
    return np.where(np.isfinite(J), J, 0.0)


def _solve(x0, lN, lD, lL, delta, max_nfev: int = 400):
    return least_squares(_residuals, x0, jac=_jacobian, args=(lN, lD, lL), loss="huber", f_scale=delta, method="trf",
                         bounds=([-np.inf, -np.inf, 1e-4, 1e-4], [np.inf, np.inf, 5.0, 5.0]), max_nfev=max_nfev)


@dataclass
class KaplanFit:
    params: np.ndarray  # log Nc, log Dc, alpha_N, alpha_D
    n: int
    rmse_log: float
    max_rel_err: float
    cost: float
    starts: int
    boot: np.ndarray | None = None  # (n_bootstrap, 4)
    holdout: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kind: str = "kaplan"
    N_is: str = "N"

    @property
    def alpha(self) -> float:
        return float(self.params[2])

    @property
    def beta(self) -> float:
        return float(self.params[3])

    def predict(self, N, D) -> np.ndarray:
        with np.errstate(all="ignore"):
            return np.exp(_log_predict(self.params, np.log(np.asarray(N, float)), np.log(np.asarray(D, float))))

    def _draws(self, N, D) -> np.ndarray:
        lN, lD = np.log(np.atleast_1d(np.asarray(N, float))), np.log(np.atleast_1d(np.asarray(D, float)))
        with np.errstate(all="ignore"):
            draws = np.exp(np.array([_log_predict(b, lN, lD) for b in self.boot]))
        draws[~np.isfinite(draws)] = np.nan
        return draws

    def predict_interval(self, N, D, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Bounds on the law's mean (bootstrap percentiles)."""
        if self.boot is None:
            p = np.atleast_1d(self.predict(N, D))
            return p, p
        return tuple(np.nanpercentile(self._draws(N, D), [50 * (1 - level), 50 * (1 + level)], axis=0))

    def run_sigma(self) -> float:
        """A new run's log-normal scatter around the law: the residual RMS with the 4 fitted degrees of
        freedom put back (as ParametricFit.run_sigma does with 5)."""
        return self.rmse_log * float(np.sqrt(self.n / max(1, self.n - len(NAMES))))

    def predict_run_interval(self, N, D, level: float = 0.95, seed: int = 0, per_draw: int = 20):
        """Interval for ONE new run at (N, D): each bootstrap law times a run's own scatter around it."""
        law = np.atleast_1d(self.predict(N, D))[None, :] if self.boot is None else self._draws(N, D)
        law = np.repeat(law, per_draw, axis=0)
        draws = law * np.exp(self.run_sigma() * np.random.default_rng(seed).standard_normal(law.shape))
        return tuple(np.nanpercentile(draws, [50 * (1 - level), 50 * (1 + level)], axis=0))

    def to_dict(self) -> dict:
        d: dict = {"kind": self.kind, "N_is": self.N_is, "form": "((Nc/N)^(alpha_N/alpha_D) + Dc/D)^alpha_D"}
        for i, name in enumerate(NAMES):
            d[name] = float(self.params[i])
            if self.boot is not None:
                col = self.boot[:, i][np.isfinite(self.boot[:, i])]
                d[f"{name}_ci"] = [float(x) for x in np.percentile(col, [2.5, 97.5])] if len(col) > 1 else None
        d["quality"] = {"n": self.n, "rmse_log_loss": self.rmse_log, "max_rel_err": self.max_rel_err,
                        "starts": self.starts, "bootstrap": 0 if self.boot is None else len(self.boot)}
        d["holdout"], d["warnings"], d["notes"] = self.holdout, self.warnings, self.notes
        return d


def fit_kaplan(N, D, loss, *, n_bootstrap: int = 200, seed: int = 0, holdout: int = 0,
               delta: float = HUBER_DELTA) -> KaplanFit:
    """Fit Kaplan's form; ``holdout=K`` leaves out the K largest-compute runs and reports them."""
    pts = check_points("kaplan fit", N=N, D=D, loss=loss)
    N, D, L = pts["N"], pts["D"], pts["loss"]
    held = np.zeros(len(N), dtype=bool)
    if holdout:
        if not 0 < holdout < len(N) - MIN_RUNS + 1:
            raise FitError(f"--holdout {holdout}: the kaplan fit needs at least {MIN_RUNS} of the {len(N)} runs left")
        held[np.argsort(N * D)[-holdout:]] = True
    fN, fD, fL = N[~held], D[~held], L[~held]
    if len(fN) < MIN_RUNS or len(np.unique(fN)) < 2 or len(np.unique(fD)) < 2:
        raise FitError(f"kaplan fit: {len(fN)} runs, {len(np.unique(fN))} sizes, {len(np.unique(fD))} budgets; its 4 "
                       f"parameters need at least {MIN_RUNS} runs over 2 sizes and 2 budgets")
    lN, lD, lL = np.log(fN), np.log(fD), np.log(fL)
    with np.errstate(all="ignore"):
        lnc, ldc, aN, aD = (GRID[:, i, None] for i in range(4))
        r = aD * np.logaddexp((aN / aD) * (lnc - lN), ldc - lD) - lL
        score = np.where(np.isfinite(r), np.minimum(r ** 2, 1e6), 1e6).sum(axis=1)
    starts = GRID[np.argsort(score)[:N_SOLVES]]
    best = None
    for x0 in starts:
        r = _solve(x0, lN, lD, lL, delta)
        if np.all(np.isfinite(r.x)) and (best is None or r.cost < best.cost):
            best = r
    if best is None:
        raise FitError("kaplan fit: the solver failed from every start; check the table for outliers")
    boot = None
    if n_bootstrap:
        rng = np.random.default_rng(seed)
        boot = np.empty((n_bootstrap, len(NAMES)))
        for i in range(n_bootstrap):
            idx = rng.integers(0, len(lN), len(lN))
            boot[i] = _solve(best.x, lN[idx], lD[idx], lL[idx], delta, max_nfev=200).x
    pred = np.exp(_log_predict(best.x, lN, lD))
    res = np.log(pred) - lL
    fit = KaplanFit(params=best.x, n=len(fN), rmse_log=float(np.sqrt(np.mean(res ** 2))),
                    max_rel_err=float(np.max(np.abs(pred / fL - 1))), cost=float(best.cost), starts=len(starts), boot=boot)
    if holdout:
        lo, hi = fit.predict_interval(N[held], D[held])
        p = fit.predict(N[held], D[held])
        fit.holdout = [{"N": float(a), "D": float(b), "C": float(6 * a * b), "measured": float(m), "predicted": float(q),
                        "predicted_ci": [float(x), float(y)], "rel_err": float(q / m - 1)}
                       for a, b, m, q, x, y in zip(N[held], D[held], L[held], p, lo, hi)]
    return fit
