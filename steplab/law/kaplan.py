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
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from steplab.law.fit import HUBER_DELTA
from steplab.law.forms import FormFit, fit_points, solve_and_bootstrap

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


@dataclass(kw_only=True)
class KaplanFit(FormFit):
    kind = "kaplan"
    NAMES = NAMES
    FORM = "((Nc/N)^(alpha_N/alpha_D) + Dc/D)^alpha_D"

    def _law(self, params, N, D):
        return np.exp(_log_predict(params, np.log(N), np.log(D)))

    @property
    def alpha(self) -> float:
        return float(self.params[2])

    @property
    def beta(self) -> float:
        return float(self.params[3])


def fit_kaplan(N, D, loss, *, n_bootstrap: int = 200, seed: int = 0, holdout: int = 0,
               delta: float = HUBER_DELTA) -> KaplanFit:
    """Fit Kaplan's form; ``holdout=K`` leaves out the K largest-compute runs and reports them."""
    N, D, L, held = fit_points("kaplan fit", N, D, loss, holdout, MIN_RUNS, 2, len(NAMES))
    fN, fD, fL = N[~held], D[~held], L[~held]
    lN, lD, lL = np.log(fN), np.log(fD), np.log(fL)
    with np.errstate(all="ignore"):
        r = _log_predict(GRID.T[:, :, None], lN, lD) - lL  # every start at once: (starts, runs)
        score = np.where(np.isfinite(r), np.minimum(r ** 2, 1e6), 1e6).sum(axis=1)
    starts = GRID[np.argsort(score)[:N_SOLVES]]
    best, boot = solve_and_bootstrap(lambda x0, *a, max_nfev=400: _solve(x0, *a, delta, max_nfev=max_nfev), starts,
                                     (lN, lD, lL), n_bootstrap, np.random.default_rng(seed), "kaplan fit", boot_nfev=200)
    return KaplanFit.from_solution(best, fN, fD, fL, len(starts), boot, N[held], D[held], L[held])
