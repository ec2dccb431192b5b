"""Plans within the data: where the compute-optimal D exceeds the unique tokens available.

Three answers, and ``data_plan`` says which it gave and why:

- **fits**: D_opt <= U, the plain compute-optimal point;
- **one epoch**: at the given compute, D = U and N = C / (6U). Along the compute line C = 6ND the fitted
  loss is convex in log N with its minimum at D_opt, so with D_opt > U the best point that sees no token
  twice is D = U exactly;
- **repeat**: allow repeated epochs, valued by the data-constrained law of Muennighoff et al. 2023
  ("Scaling Data-Constrained Language Models", arXiv 2305.16264, eq. 5): D tokens drawn from U unique ones
  count as D' = U + U R* (1 - exp(-R / R*)), R = D/U - 1 repetitions, with their fitted R* = 15.4 (each
  repetition is worth a little less; four epochs are worth ~3.7 unique ones). The loss law is evaluated at
  (N, D') and minimised over N on the compute line.

``mode="auto"`` repeats when the repeat optimum needs at most ``MAX_EPOCHS`` epochs (Muennighoff et al.:
up to ~4 epochs are almost as good as fresh data, so the law's discount is small and well measured there);
beyond that it plans one epoch at the given compute, since the law is extrapolating and the value of more
repetitions falls off fast. The law is the paper's, not fitted to our runs: say so where it is used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from steplab.errors import ConfigError

R_STAR = 15.4      # Muennighoff et al. 2023, fitted R_D* (decay constant of repeated tokens' value)
MAX_EPOCHS = 4.0   # auto mode repeats up to this many epochs
MODES = ("auto", "repeat", "one-epoch")


def effective_tokens(D, unique: float, r_star: float = R_STAR) -> np.ndarray:
    """D' of D training tokens drawn from ``unique`` unique ones (D' = D while D <= unique)."""
    D = np.asarray(D, float)
    R = np.maximum(D / unique - 1.0, 0.0)
    return np.where(D <= unique, D, unique + unique * r_star * (1.0 - np.exp(-R / r_star)))


def line_optimum(predict, C: float, unique: float | None = None, repeat: bool = False) -> tuple[float, float]:
    """(N, D) minimising ``predict(N, D')`` on C = 6ND, numerically (any law form). Without ``repeat``, D <= unique."""
    def loss(logN):
        N = math.exp(logN)
        D = C / (6 * N)
        if unique is not None:
            D = float(effective_tokens(D, unique)) if repeat else D
        return float(predict(N, D))

    lo, hi = math.log(max(1.0, C / 6 / 1e15)), math.log(C / 6)  # D from 1 token up to 1e15 tokens
    if unique is not None and not repeat:
        lo = max(lo, math.log(C / (6 * unique)))  # D <= unique
    grid = np.linspace(lo, hi, 400)
    vals = [loss(g) for g in grid]
    i = int(np.nanargmin(vals))
    a, b = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    r = minimize_scalar(loss, bounds=(a, b), method="bounded", options={"xatol": 1e-6})
    N = math.exp(r.x if r.fun <= vals[i] else grid[i])
    return N, C / (6 * N)


@dataclass
class DataPlan:
    N: float
    D: float                 # training tokens (may exceed unique when repeating)
    D_effective: float       # what the loss law sees (= D without repetition)
    epochs: float            # D / unique
    kind: str                # fits | one-epoch | repeat
    why: str
    N_opt: float             # the unconstrained compute-optimal point, for the record
    D_opt: float


def data_plan(law, compute: float, unique: float, mode: str = "auto") -> DataPlan:
    """Plan ``compute`` FLOPs with ``unique`` tokens available; ``law`` has predict(N, D) (any form)."""
    if mode not in MODES:
        raise ConfigError(f"plan: data mode {mode!r} is not one of {', '.join(MODES)}")
    if not (math.isfinite(unique) and unique > 0):
        raise ConfigError(f"plan: unique tokens = {unique!r} must be a positive number")
    N_opt, D_opt = line_optimum(law.predict, compute)
    if D_opt <= unique:
        return DataPlan(N_opt, D_opt, D_opt, D_opt / unique, "fits",
                        f"the compute-optimal D ({D_opt:.3g}) fits in the {unique:.3g} unique tokens", N_opt, D_opt)
    Nr, Dr = line_optimum(law.predict, compute, unique, repeat=True)
    epochs = Dr / unique
    repeat = mode == "repeat" or (mode == "auto" and epochs <= MAX_EPOCHS)
    if repeat:
        why = (f"D_opt = {D_opt:.3g} exceeds the {unique:.3g} unique tokens; planned with repeated epochs "
               f"({epochs:.2f} epochs), valued by Muennighoff et al. 2023's data-constrained law (R* = {R_STAR}, "
               "from the paper, not fitted here)" + (": within 4 epochs repeated tokens are worth nearly as much as "
                                                     "fresh ones" if mode == "auto" else ""))
        return DataPlan(Nr, Dr, float(effective_tokens(Dr, unique)), epochs, "repeat", why, N_opt, D_opt)
    N1 = compute / (6 * unique)
    why = (f"D_opt = {D_opt:.3g} exceeds the {unique:.3g} unique tokens; planned one epoch: D = the unique tokens, "
           f"N = C/(6D) = {N1:.3g} (on the compute line the loss falls toward D_opt, so D = U is the best point "
           "that repeats nothing)")
    if mode == "auto":
        why += (f"; repeating would need {epochs:.1f} epochs, beyond the ~{MAX_EPOCHS:g} where repeated data is "
                "nearly as good as fresh (Muennighoff et al. 2023)")
    return DataPlan(N1, unique, unique, 1.0, "one-epoch", why, N_opt, D_opt)


def d_opt_interval(fit, compute: float, level: float = 0.95) -> tuple[float, float] | None:
    """Bootstrap interval of the compute-optimal D at ``compute`` (Chinchilla-form fits with draws)."""
    if getattr(fit, "boot", None) is None:
        return None
    E, A, B, al, be = (fit.boot[:, i] for i in range(5))
    with np.errstate(all="ignore"):
        s = al + be
        G = (al * A / (be * B)) ** (1 / s)
        N = G * (compute / 6) ** (be / s)
        D = compute / (6 * N)
    D = D[np.isfinite(D) & (D > 0)]
    if len(D) < 2:
        return None
    lo, hi = np.percentile(D, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)
