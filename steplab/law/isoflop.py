"""Chinchilla's IsoFLOP approaches 1 (the envelope: the lowest loss per compute budget) and 2 (a parabola in
log N per budget, its vertex the optimum), with N_opt ~ C^a and D_opt ~ C^b fitted over the budgets' optima and
bootstrap intervals from resampling runs within each budget (Hoffmann et al. 2022, sections 3.1-3.2)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from steplab.errors import FitError
from steplab.law.fit import Estimate, _warn, check_points, summarise


def compute_groups(C: np.ndarray, budget: np.ndarray | None = None, gap_decades: float = 0.05) -> np.ndarray:
    """IsoFLOP group ids: the nominal budget where the table has one, else clusters of log10 C split at
    gaps wider than ``gap_decades`` (runs of one budget differ in C only through rounding of N and D)."""
    if budget is not None and np.all(np.isfinite(budget)):
        return np.unique(budget, return_inverse=True)[1].ravel()
    order = np.argsort(C)
    lc = np.log10(C[order])
    ids = np.empty(len(C), dtype=int)
    ids[order] = np.concatenate([[0], np.cumsum(np.diff(lc) > gap_decades)])
    return ids


@dataclass
class IsoFLOPFit:
    approach: int                  # 1: envelope (min loss per budget); 2: parabola vertex per budget
    a: Estimate                    # N_opt = kN * C^a
    b: Estimate                    # D_opt = kD * C^b
    kN: float
    kD: float
    points: list[dict]             # per budget: C, N_opt, D_opt, loss at optimum (and parabola for approach 2)
    rmse_log_N: float
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"approach": self.approach, "a": self.a.value, "a_se": self.a.se, "a_ci": list(self.a.ci),
                "b": self.b.value, "b_se": self.b.se, "b_ci": list(self.b.ci), "kN": self.kN, "kD": self.kD,
                "quality": {"groups": len(self.points), "rmse_log_N_opt": self.rmse_log_N},
                "points": self.points, "warnings": self.warnings, "notes": self.notes}


def _parabola(lN: np.ndarray, L: np.ndarray) -> tuple[float, float, float] | None:
    """loss = c2 x^2 + c1 x + c0 in x = log N; None without curvature (no minimum to read off)."""
    c2, c1, c0 = np.polyfit(lN, L, 2)
    return (c2, c1, c0) if c2 > 0 else None


def _group_optima(lN, lD, L, lC, groups, approach: int):
    """Per group (log C, log N_opt, log D_opt, loss, coefs); coefs only for approach 2. Groups that
    give no minimum, or a parabola vertex outside the sampled sizes, are skipped with a reason."""
    out, skipped = [], []
    for g in np.unique(groups):
        m = groups == g
        c = float(np.mean(lC[m]))
        if len(np.unique(lN[m])) < 3:
            skipped.append((c, "fewer than 3 model sizes"))
            continue
        if approach == 1:
            i = np.argmin(L[m])
            out.append((c, lN[m][i], lD[m][i], L[m][i], None))
            continue
        coefs = _parabola(lN[m], L[m])
        if coefs is None:
            skipped.append((c, "loss has no minimum in log N (parabola opens downward)"))
            continue
        x = -coefs[1] / (2 * coefs[0])
        if not lN[m].min() <= x <= lN[m].max():
            skipped.append((c, "vertex outside the sampled sizes"))
            continue
        out.append((c, x, c - np.log(6) - x, float(np.polyval(coefs, x)), coefs))
    return out, skipped


def _powerlaw(lC: np.ndarray, ly: np.ndarray) -> tuple[float, float]:
    slope, intercept = np.polyfit(lC, ly, 1)
    return float(slope), float(intercept)


def fit_isoflop(N, D, loss, *, C=None, budget=None, approach: int = 2, n_bootstrap: int = 1000,
                seed: int = 0) -> IsoFLOPFit:
    """Chinchilla approach 1 (envelope) or 2 (IsoFLOP parabolas): N_opt ~ C^a and D_opt ~ C^b."""
    pts = check_points(f"IsoFLOP approach {approach}", N=N, D=D, loss=loss)
    N, D, L = pts["N"], pts["D"], pts["loss"]
    C = 6 * N * D if C is None else np.asarray(C, float)
    groups = compute_groups(C, None if budget is None else np.asarray(budget, float))
    # A nominal budget is the compute level the study intended; otherwise the group's mean log C.
    lC = np.log(np.asarray(budget, float)) if budget is not None and np.all(np.isfinite(budget)) else np.log(C)
    lN, lD = np.log(N), np.log(D)
    sink: list[str] = []

    opt, skipped = _group_optima(lN, lD, L, lC, groups, approach)
    for c, why in skipped:
        _warn(sink, f"IsoFLOP budget {np.exp(c):.3g}: skipped ({why})")
    if len(opt) < 2:
        raise FitError(f"IsoFLOP approach {approach}: {len(opt)} usable compute level(s) of "
                       f"{len(np.unique(groups))}; need at least 2, each with 3 or more model sizes")
    if len(opt) == 2:
        _warn(sink, "only 2 compute levels: the exponent has no residual to check it against")
    spread = max(np.ptp(np.log10(C[groups == g])) for g in np.unique(groups))
    if budget is None and spread > 0.15:
        _warn(sink, f"compute levels span up to {spread:.2f} decades each: these are not clean IsoFLOP "
                    "budgets; give the table a budget column")
    oc, oN, oD = (np.array([o[i] for o in opt]) for i in range(3))
    a, kN = _powerlaw(oc, oN)
    b, kD = _powerlaw(oc, oD)
    rmse = float(np.sqrt(np.mean((kN + a * oc - oN) ** 2)))

    draws = np.full((n_bootstrap, 2), np.nan)
    rng = np.random.default_rng(seed)
    ids = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    for i in range(n_bootstrap):
        idx = np.concatenate([rng.choice(g, len(g)) for g in ids])  # resample runs within each budget
        bo, _ = _group_optima(lN[idx], lD[idx], L[idx], lC[idx], groups[idx], approach)
        if len(bo) >= 2:
            bc = np.array([o[0] for o in bo])
            draws[i] = _powerlaw(bc, np.array([o[1] for o in bo]))[0], _powerlaw(bc, np.array([o[2] for o in bo]))[0]
    points = [{"C": float(np.exp(o[0])), "N_opt": float(np.exp(o[1])), "D_opt": float(np.exp(o[2])),
               "loss": float(o[3]), **({"parabola": [float(c) for c in o[4]]} if o[4] is not None else {})}
              for o in opt]
    return IsoFLOPFit(approach, summarise(a, draws[:, 0] if n_bootstrap else None),
                      summarise(b, draws[:, 1] if n_bootstrap else None), float(np.exp(kN)), float(np.exp(kD)),
                      points, rmse, sink)
