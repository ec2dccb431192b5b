"""The Farseer loss law (StepFun, "Predictable Scale: Part II", arXiv 2506.10972) next to Chinchilla's.

Chinchilla's form L = E + A/N^alpha + B/D^beta gives every model size the same data exponent beta and the same
data-independent floor. Farseer lets both depend on N:

    L(N, D) = exp(a3 N^g3 + b3) + exp(a2 N^g2 + b2) * D^(-exp(a1 N^g1 + b1))

i.e. L = E(N) + B(N) D^(-beta(N)), each of E, B, beta a stretched exponential in N (9 parameters). We fit that
form directly (the paper fits it by differential piecewise steps on a far larger grid): N and D in units of
their geometric means over the fitted runs (n = N/N0, d = D/D0; with these units the form is the same family
up to how beta(N) enters through D0, which the fit absorbs), minimising the same Huber loss of log residuals
as the Chinchilla fit (delta 1e-3) with scipy's trust-region least squares from seeded random starts,
bootstrap over runs for intervals. Nine parameters need data: at least 12 runs, 3 sizes and 3 budgets.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from steplab.law.fit import HUBER_DELTA
from steplab.law.forms import FormFit, fit_points, solve_and_bootstrap

NAMES = ("a1", "b1", "g1", "a2", "b2", "g2", "a3", "b3", "g3")
MIN_RUNS = 12


def _predict(p: np.ndarray, n: np.ndarray, d: np.ndarray) -> np.ndarray:
    a1, b1, g1, a2, b2, g2, a3, b3, g3 = p
    beta = np.exp(a1 * n ** g1 + b1)
    return np.exp(a3 * n ** g3 + b3) + np.exp(a2 * n ** g2 + b2 - beta * np.log(d))


def _residuals(p, n, d, lL):
    with np.errstate(all="ignore"):
        r = np.log(_predict(p, n, d)) - lL
    return np.where(np.isfinite(r), r, 10.0)


def _jacobian(p, n, d, lL):
    """d(log L)/d(params), exact: L = E + Bt, E = e^(a3 n^g3 + b3), Bt = e^(a2 n^g2 + b2 - beta ln d), beta = e^(a1 n^g1 + b1)."""
    a1, b1, g1, a2, b2, g2, a3, b3, g3 = p
    ln_n, ln_d = np.log(n), np.log(d)
    with np.errstate(all="ignore"):
        p1, p2, p3 = n ** g1, n ** g2, n ** g3
        beta = np.exp(a1 * p1 + b1)
        E = np.exp(a3 * p3 + b3)
        Bt = np.exp(a2 * p2 + b2 - beta * ln_d)
        L = E + Bt
        dbeta = -Bt * ln_d * beta  # dL/d(a1 n^g1 + b1)
        J = np.stack([dbeta * p1, dbeta, dbeta * a1 * p1 * ln_n, Bt * p2, Bt, Bt * a2 * p2 * ln_n,
                      E * p3, E, E * a3 * p3 * ln_n], axis=1) / L[:, None]
    return np.where(np.isfinite(J), J, 0.0)


def _solve(x0, n, d, lL, delta, max_nfev: int = 1000):
    # The valley along which E(N) and B(N) trade off is long and flat: a refit runs to max_nfev without
    # gaining much, so the cap (1000 from a start, 300 for a bootstrap refit from the optimum) bounds the cost.
    return least_squares(_residuals, x0, jac=_jacobian, args=(n, d, lL), loss="huber", f_scale=delta, method="trf",
                         x_scale="jac", max_nfev=max_nfev)


@dataclass(kw_only=True)
class FarseerFit(FormFit):
    N0: float
    D0: float
    kind = "farseer"
    NAMES = NAMES
    FORM = "exp(a3 n^g3 + b3) + exp(a2 n^g2 + b2) d^-exp(a1 n^g1 + b1), n = N/N0, d = D/D0"

    def _law(self, params, N, D):
        return _predict(params, N / self.N0, D / self.D0)

    def beta_of(self, N) -> np.ndarray:
        """The data exponent at size N (Chinchilla's beta is one number for all N)."""
        a1, b1, g1 = self.params[:3]
        return np.exp(a1 * (np.asarray(N, float) / self.N0) ** g1 + b1)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "N0": self.N0, "D0": self.D0}


def fit_farseer(N, D, loss, *, n_bootstrap: int = 200, seed: int = 0, holdout: int = 0, n_starts: int = 16,
                delta: float = HUBER_DELTA) -> FarseerFit:
    """Fit the Farseer form; ``holdout=K`` leaves out the K largest-compute runs and reports them."""
    N, D, L, held = fit_points("farseer fit", N, D, loss, holdout, MIN_RUNS, 3, len(NAMES), " (use --form chinchilla)")
    fN, fD, fL = N[~held], D[~held], L[~held]
    N0, D0 = float(np.exp(np.log(fN).mean())), float(np.exp(np.log(fD).mean()))
    n, d, lL = fN / N0, fD / D0, np.log(fL)

    # Starts: a Chinchilla-like point (constant beta ~0.3, E ~ 0.8 of the smallest loss) plus seeded jitter.
    rng = np.random.default_rng(seed)
    base = np.array([0.0, np.log(0.3), 0.0, 0.0, np.log(0.2 * fL.min()), 0.0, 0.0, np.log(0.8 * fL.min()), 0.0])
    starts = [base] + [base + rng.normal(0, [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.3, 0.2, 0.5]) for _ in range(n_starts - 1)]
    best, boot = solve_and_bootstrap(lambda x0, *a, max_nfev=1000: _solve(x0, *a, delta, max_nfev=max_nfev), starts,
                                     (n, d, lL), n_bootstrap, rng, "farseer fit", boot_nfev=300)
    return FarseerFit.from_solution(best, fN, fD, fL, len(starts), boot, N[held], D[held], L[held], N0=N0, D0=D0)
