"""Loss scaling-law fits: the parametric form L = E + A/N^alpha + B/D^beta, and `fit_table`, which fits a table of runs
by the kind it asks for (IsoFLOP approaches 1 and 2 live in `steplab.law.isoflop`).

The parametric fit follows Hoffmann et al. (approach 3) as Epoch's replication runs it: predict log L as
LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e; minimise the sum of Huber(delta=1e-3)
losses of the log residuals with a quasi-Newton minimiser (BFGS; Hoffmann's L-BFGS-B on request) from a
grid of starts; bootstrap the runs for intervals.
Every fit checks its inputs first and says why it cannot fit, rather than return a number nobody should use.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from steplab.errors import FitError
from steplab.law.tables import RunsTable, best_per_cell

HUBER_DELTA = 1e-3
PARAM_NAMES = ("E", "A", "B", "alpha", "beta")
MIN_SPAN = 1.5  # an exponent needs its variable to move: max/min below this and it is noise
# Epoch's grid of starts (log A, log B, log E, alpha, beta): 6 * 6 * 5 * 5 * 5 = 4500 points.
START_GRID = np.array(list(itertools.product(
    np.arange(0, 30, 5), np.arange(0, 30, 5), np.arange(-1, 1.5, 0.5),
    np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5))), dtype=float)


class FitWarning(UserWarning):
    """A fit that ran but deserves suspicion (parameter at an edge, wide interval, dropped rows)."""


def _warn(sink: list[str], message: str) -> None:
    sink.append(message)
    warnings.warn(message, FitWarning, stacklevel=3)


@dataclass(frozen=True)
class Estimate:
    value: float
    se: float = float("nan")
    ci: tuple[float, float] = (float("nan"), float("nan"))


def summarise(value: float, draws: np.ndarray | None, level: float = 0.95) -> Estimate:
    """A point estimate with the bootstrap standard error and percentile interval."""
    if draws is None or np.isfinite(draws).sum() < 2:
        return Estimate(float(value))
    d = draws[np.isfinite(draws)]
    lo, hi = np.percentile(d, [50 * (1 - level), 50 * (1 + level)])
    with np.errstate(over="ignore"):  # draws of A or B near 1e200 (a barely determined exponent): the se is inf
        se = float(d.std(ddof=1))
    return Estimate(float(value), se, (float(lo), float(hi)))


def check_points(what: str, **arrays: np.ndarray) -> dict[str, np.ndarray]:
    """Finite, positive, same-length 1-D float arrays, or a FitError that names the first offender."""
    out = {k: np.asarray(v, dtype=float).ravel() for k, v in arrays.items()}
    lengths = {len(v) for v in out.values()}
    if len(lengths) != 1:
        raise FitError(f"{what}: columns have different lengths {sorted(lengths)}; pass one value per run")
    for name, v in out.items():
        bad = ~np.isfinite(v) | (v <= 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise FitError(f"{what}: {int(bad.sum())} value(s) of {name} are NaN, infinite or not positive "
                           f"(first at row {i}: {v[i]}); fix the table or load it with --drop-invalid")
    return out


# ------------------------------------------------------------------------------------- parametric form

def _objective(p: np.ndarray, lN: np.ndarray, lD: np.ndarray, lL: np.ndarray, delta: float):
    """Sum of Huber losses of log residuals, and its exact gradient (so the minimiser needs no finite differences)."""
    a, b, e, alpha, beta = p
    z = np.stack([a - alpha * lN, b - beta * lD, np.full_like(lN, e)])
    m = z.max(axis=0)
    w = np.exp(z - m)
    s = w.sum(axis=0)
    r = m + np.log(s) - lL
    w /= s  # softmax weights = d(LSE)/d(term)
    ar = np.abs(r)
    value = np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)).sum()
    g = np.clip(r, -delta, delta)
    grad = np.array([g @ w[0], g @ w[1], g @ w[2], -(g * w[0]) @ lN, -(g * w[1]) @ lD])
    return value, grad


def _objective_many(P: np.ndarray, lN, lD, lL, delta: float) -> np.ndarray:
    """The objective at many parameter vectors at once: scores the whole start grid in one pass."""
    z = np.stack([P[:, 0, None] - P[:, 3, None] * lN, P[:, 1, None] - P[:, 4, None] * lD,
                  np.broadcast_to(P[:, 2, None], (len(P), len(lN)))])
    m = z.max(axis=0)
    r = m + np.log(np.exp(z - m).sum(axis=0)) - lL
    ar = np.abs(r)
    return np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)).sum(axis=1)


def _scaled(p, lN, lD, lL, delta):
    # The raw sum is ~1e-3, far below scipy's stopping scale (relative change against max(|f|, 1)), so a
    # bootstrap refit would stop at its start and the intervals would come out ~30x too narrow. Dividing by
    # n * delta^2 makes the objective O(1) in units of the Huber threshold.
    value, grad = _objective(p, lN, lD, lL, delta)
    scale = 1.0 / (len(lN) * delta * delta)
    return value * scale, grad * scale


def _minimize(x0, lN, lD, lL, delta, method: str = "BFGS"):
    # BFGS by default, not Hoffmann's L-BFGS-B: with 5 parameters both are the same quasi-Newton method and
    # land on the same optimum, but scipy's L-BFGS-B calls threaded BLAS on tiny matrices and runs 5-10x
    # slower on a busy machine (measured on 2 cores while a sweep trains). method="L-BFGS-B" is kept.
    options = {"ftol": 1e-12, "gtol": 1e-8} if method == "L-BFGS-B" else {}
    r = minimize(_scaled, x0, args=(lN, lD, lL, delta), jac=True, method=method, options=options)
    r.fun = r.fun * len(lN) * delta * delta  # back to the plain sum of Huber losses
    return r


def run_scatter(rmse_log: float, n: int, n_params: int) -> float:
    """A single run's scatter around a fitted law, in log loss: the fit's RMSE scaled by sqrt(n / (n - k)) for
    its k fitted parameters (the residuals of a fit understate the scatter of a new run)."""
    return rmse_log * float(np.sqrt(n / (n - n_params))) if n > n_params else rmse_log


def one_run_interval(law: np.ndarray, sigma: float, level: float, seed: int, per_draw: int) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of ONE new run: each law draw (rows of ``law``: (draws, points)) times ``per_draw``
    log-normal scatters of width ``sigma``."""
    law = np.repeat(law, per_draw, axis=0)
    draws = law * np.exp(sigma * np.random.default_rng(seed).standard_normal(law.shape))
    lo, hi = np.nanpercentile(draws, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return lo, hi


@dataclass
class ParametricFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    n: int
    objective: float               # sum of Huber losses, Epoch's units (0.0010183 on their 240 points)
    rmse_log: float                # RMSE of log(loss) residuals
    max_rel_err: float
    starts: int
    starts_at_best: int            # polished starts that reached the best objective (1e-6 relative)
    boot: np.ndarray | None = None  # (n_bootstrap, 5): E, A, B, alpha, beta
    holdout: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kind: str = "chinchilla"
    N_is: str = "N"                # "N_active" when fitted on MoE runs (C = 6 N_active D)

    def predict(self, N, D) -> np.ndarray:
        return self.E + self.A / np.asarray(N, float) ** self.alpha + self.B / np.asarray(D, float) ** self.beta

    def predict_interval(self, N, D, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        if self.boot is None:
            p = self.predict(N, D)
            return p, p
        E, A, B, al, be = (self.boot[:, i, None] for i in range(5))
        draws = E + A / np.atleast_1d(N) ** al + B / np.atleast_1d(D) ** be
        lo, hi = np.nanpercentile(draws, [50 * (1 - level), 50 * (1 + level)], axis=0)
        return lo, hi

    def run_sigma(self) -> float:
        return run_scatter(self.rmse_log, self.n, 5)

    def predict_run_interval(self, N, D, level: float = 0.95, seed: int = 0, per_draw: int = 20) -> tuple[np.ndarray, np.ndarray]:
        """Interval for the loss of ONE new run at (N, D): each bootstrap draw of the law times a run's own
        log-normal scatter around it (``run_sigma``). :meth:`predict_interval` bounds the law's mean only; a run
        also lands off the law by about the scatter the sweep's runs show around it, which it does not count."""
        if self.boot is None:
            law = np.atleast_1d(self.predict(N, D))[None, :]
        else:
            E, A, B, al, be = (self.boot[:, i, None] for i in range(5))
            law = E + A / np.atleast_1d(N) ** al + B / np.atleast_1d(D) ** be
        return one_run_interval(law, self.run_sigma(), level, seed, per_draw)

    def allocation(self, C) -> tuple[np.ndarray, np.ndarray]:
        """Compute-optimal N and D for C = 6 N D (Hoffmann eq. 4): N_opt = G (C/6)^a, a = beta/(alpha+beta)."""
        s = self.alpha + self.beta
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1 / s)
        N = G * (np.asarray(C, float) / 6) ** (self.beta / s)
        return N, np.asarray(C, float) / (6 * N)

    def estimates(self) -> dict[str, Estimate]:
        out = {name: summarise(getattr(self, name), None if self.boot is None else self.boot[:, i])
               for i, name in enumerate(PARAM_NAMES)}
        a = self.beta / (self.alpha + self.beta)
        draws = None if self.boot is None else self.boot[:, 4] / (self.boot[:, 3] + self.boot[:, 4])
        out["a"] = summarise(a, draws)  # N_opt ~ C^a
        out["b"] = summarise(1 - a, None if draws is None else 1 - draws)
        return out

    def to_dict(self) -> dict:
        d: dict = {"kind": self.kind, "N_is": self.N_is}
        for name, est in self.estimates().items():
            d[name], d[f"{name}_se"], d[f"{name}_ci"] = est.value, est.se, list(est.ci)
        d["quality"] = {"n": self.n, "huber_objective": self.objective, "rmse_log_loss": self.rmse_log,
                        "max_rel_err": self.max_rel_err, "starts": self.starts,
                        "starts_at_best": self.starts_at_best,
                        "bootstrap": 0 if self.boot is None else len(self.boot)}
        d["holdout"], d["warnings"], d["notes"] = self.holdout, self.warnings, self.notes
        return d


def fit_parametric(N, D, loss, *, n_bootstrap: int = 1000, seed: int = 0, delta: float = HUBER_DELTA,
                   n_starts: int = 64, holdout: int = 0, method: str = "BFGS") -> ParametricFit:
    """Fit L = E + A/N^alpha + B/D^beta. ``holdout=K`` fits without the K largest-compute runs and
    reports predicted vs measured loss for them. ``method`` is the scipy minimiser run from each start."""
    pts = check_points("parametric fit", N=N, D=D, loss=loss)
    N, D, L = pts["N"], pts["D"], pts["loss"]
    held = split_holdout(N, D, holdout, 6, "the parametric fit")
    fit_N, fit_D, fit_L = N[~held], D[~held], L[~held]
    _check_identifiable(fit_N, fit_D)
    lN, lD, lL = np.log(fit_N), np.log(fit_D), np.log(fit_L)

    # Score all 4500 of Epoch's starts in one vectorised pass, then minimise from the best n_starts:
    # the same basins are found for a fraction of the cost (all 4500 take ~13 s on 240 points).
    scores = _objective_many(START_GRID, lN, lD, lL, delta)
    starts = START_GRID[np.argsort(scores, kind="stable")[:n_starts]]
    runs = [_minimize(x0, lN, lD, lL, delta, method) for x0 in starts]
    ok = [r for r in runs if np.all(np.isfinite(r.x))]
    if not ok:
        raise FitError("parametric fit: the minimiser failed from every start; check the table for outliers")
    best = min(ok, key=lambda r: r.fun)
    at_best = sum(r.fun <= best.fun * (1 + 1e-6) for r in ok)
    x = best.x

    boot = None
    if n_bootstrap:
        rng = np.random.default_rng(seed)
        boot = np.empty((n_bootstrap, 5))
        for i in range(n_bootstrap):
            idx = rng.integers(0, len(lN), len(lN))
            # Epoch's bootstrap: BFGS from a good point (here the full-data optimum), not from the grid.
            bx = _minimize(x, lN[idx], lD[idx], lL[idx], delta).x
            boot[i] = np.exp(bx[[2, 0, 1]]).tolist() + [bx[3], bx[4]]

    E, A, B = np.exp([x[2], x[0], x[1]])
    pred = E + A / fit_N ** x[3] + B / fit_D ** x[4]
    res = np.log(pred) - lL
    fit = ParametricFit(E=float(E), A=float(A), B=float(B), alpha=float(x[3]), beta=float(x[4]), n=len(fit_N),
                        objective=float(best.fun), rmse_log=float(np.sqrt(np.mean(res ** 2))),
                        max_rel_err=float(np.max(np.abs(pred / fit_L - 1))), starts=len(runs),
                        starts_at_best=int(at_best), boot=boot)
    fit.holdout = holdout_report(fit, N[held], D[held], L[held])
    _sanity(fit, fit_N, fit_D)
    return fit


def split_holdout(N: np.ndarray, D: np.ndarray, holdout: int, min_fit: int, what: str) -> np.ndarray:
    """Mask of the ``holdout`` largest-compute runs (none for 0); a FitError unless ``min_fit`` runs stay to fit."""
    held = np.zeros(len(N), dtype=bool)
    if holdout:
        if not 0 < holdout <= len(N) - min_fit:
            raise FitError(f"--holdout {holdout}: {what} needs at least {min_fit} of the {len(N)} runs left to fit")
        held[np.argsort(N * D)[-holdout:]] = True
    return held


def holdout_report(fit, N: np.ndarray, D: np.ndarray, L: np.ndarray) -> list[dict]:
    """Predicted (with the fit's interval) vs measured loss of held-out runs, one dict per run."""
    if not len(N):
        return []
    lo, hi = fit.predict_interval(N, D)
    p = np.atleast_1d(fit.predict(N, D))
    return [{"N": float(n), "D": float(d), "C": float(6 * n * d), "measured": float(m), "predicted": float(q),
             "predicted_ci": [float(a), float(b)], "rel_err": float(q / m - 1)}
            for n, d, m, q, a, b in zip(N, D, L, p, lo, hi)]


def _check_identifiable(N: np.ndarray, D: np.ndarray) -> None:
    if len(N) < 5:
        raise FitError(f"parametric fit: {len(N)} runs for 5 parameters (E, A, B, alpha, beta); "
                       "add runs (at least 3 sizes x 3 token budgets is a sensible minimum)")
    for name, v, param in (("N", N, "alpha"), ("D", D, "beta")):
        k, ratio = len(np.unique(v)), v.max() / v.min()
        if k < 3 or ratio < MIN_SPAN:
            raise FitError(f"parametric fit: {k} distinct {name} value(s) spanning x{ratio:.3g}, so {param} cannot "
                           f"be separated from E; sweep at least 3 values of {name} over x{MIN_SPAN:g} or more")


def _sanity(fit: ParametricFit, N: np.ndarray, D: np.ndarray) -> None:
    """Warn about fits that converged but sit where the data give little information."""
    level = float(np.mean(fit.predict(N, D)))
    for name, term, var in (("alpha", fit.A / N ** fit.alpha, "N"), ("beta", fit.B / D ** fit.beta, "D")):
        if np.ptp(term) < 1e-3 * level:
            _warn(fit.warnings, f"the {var} term moves the loss by under 0.1% across these runs, so {name} "
                                f"(= {getattr(fit, name):.3g}) is not determined by the data; widen the range of {var}")
    if fit.E < 0.05 * level:
        _warn(fit.warnings, f"E = {fit.E:.3g} ran to zero: the runs do not pin down the irreducible loss (too few "
                            "well-trained large runs?), and alpha, beta absorb it; treat the exponents with care")
    for name in ("alpha", "beta"):
        v = getattr(fit, name)
        if not 0.02 < v < 3:
            _warn(fit.warnings, f"{name} = {v:.3g} is at the edge of plausible values: the runs barely "
                                f"constrain it; widen the range of {'N' if name == 'alpha' else 'D'}")
    if fit.boot is not None:
        for i, name in ((3, "alpha"), (4, "beta"), (0, "E")):
            lo, hi = np.nanpercentile(fit.boot[:, i], [2.5, 97.5])
            if hi - lo > abs(fit.boot[:, i].mean()):
                _warn(fit.warnings, f"{name} is poorly determined: 95% bootstrap interval [{lo:.3g}, {hi:.3g}]")
    if fit.starts_at_best == 1 and fit.starts > 1:
        _warn(fit.warnings, "only one start reached the best objective: the optimum may be fragile")


# ------------------------------------------------------------------------------------------- tables

KINDS = ("auto", "chinchilla", "isoflop", "hparams")


def detect_kind(table: RunsTable) -> str:
    """An lr x batch sweep (several runs per (N, D) cell with different lr) -> hparams; else chinchilla."""
    if "lr" in table and "batch_tokens" in table and len(table):
        cells = np.unique(np.stack([table["N"], table["D"]], 1), axis=0)
        if len(cells) * 3 <= len(table) and len(np.unique(table["lr"])) > 1:
            return "hparams"
    return "chinchilla"


def usable(table: RunsTable, cols: tuple[str, ...], drop_invalid: bool, sink: list[str]) -> RunsTable:
    """The rows a log-log fit can use; invalid rows are an error unless the user asked to drop them."""
    bad = table.invalid(*cols)
    if not bad.any():
        return table
    i = int(np.argmax(bad))
    where = f"row {i}" + (f" ({table.data['label'][i]})" if "label" in table else "")
    if not drop_invalid:
        raise FitError(f"{table.source}: {int(bad.sum())} of {len(table)} runs have NaN, infinite or "
                       f"non-positive {'/'.join(cols)} (first: {where}); fix them or pass --drop-invalid")
    _warn(sink, f"dropped {int(bad.sum())} runs with NaN, infinite or non-positive {'/'.join(cols)} "
                f"(first: {where})")
    return table.subset(~bad)


FORMS = ("chinchilla", "farseer", "kaplan")


def fit_table(table: RunsTable, kind: str = "auto", *, holdout: int = 0, n_bootstrap: int = 1000,
              seed: int = 0, drop_invalid: bool = False, form: str = "chinchilla"):
    """Dispatch a runs table to its fit. Returns ParametricFit (FarseerFit / KaplanFit with ``form=``), a list
    of IsoFLOPFit (approaches 1 and 2) or HparamFit."""
    if kind not in KINDS:
        raise FitError(f"--kind {kind}: choose one of {', '.join(KINDS)}")
    if form not in FORMS:
        raise FitError(f"--form {form}: choose one of {', '.join(FORMS)}")
    kind = detect_kind(table) if kind == "auto" else kind
    if form != "chinchilla":
        if kind != "chinchilla":
            raise FitError(f"--form {form} is a loss law of N and D: use it with --kind chinchilla (or auto), not {kind}")
    if holdout and kind != "chinchilla":  # (farseer is checked above to be a chinchilla-kind fit)
        raise FitError(f"--holdout applies to the chinchilla (parametric) fit, not to --kind {kind}")
    if "dataset" in table and len(set(table["dataset"])) > 1:
        names = sorted(set(table["dataset"]))
        listed = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise FitError(f"{table.source} mixes {len(names)} datasets ({listed}); a law holds for "
                       f"one data distribution: add --where dataset={names[0]}")
    sink: list[str] = []
    if kind == "hparams":
        from steplab.law.hparams import fit_hparam_laws
        fit = fit_hparam_laws(usable(table, ("N", "D", "loss", "lr", "batch_tokens"), drop_invalid, sink),
                              n_bootstrap=n_bootstrap, seed=seed)
        fit.warnings[:0], fit.notes[:0] = sink, table.notes
        return fit
    table, N_is = in_active_params(usable(table, ("N", "D", "loss"), drop_invalid, sink))
    table, _ = best_per_cell(table)
    if kind == "chinchilla" and form != "chinchilla":
        from steplab.law.farseer import fit_farseer  # both modules build on this one
        from steplab.law.kaplan import fit_kaplan

        fit = {"farseer": fit_farseer, "kaplan": fit_kaplan}[form](table["N"], table["D"], table["loss"],
                                                                 n_bootstrap=n_bootstrap, seed=seed, holdout=holdout)
    elif kind == "chinchilla":
        fit = fit_parametric(table["N"], table["D"], table["loss"], n_bootstrap=n_bootstrap, seed=seed,
                             holdout=holdout)
    else:
        budget = table.data.get("budget")
        from steplab.law.isoflop import fit_isoflop  # isoflop.py builds on this module's helpers

        fit = [fit_isoflop(table["N"], table["D"], table["loss"], C=table["C"], budget=budget, approach=k,
                           n_bootstrap=n_bootstrap, seed=seed) for k in (1, 2)]
    for f in fit if isinstance(fit, list) else [fit]:
        f.warnings[:0], f.notes[:0] = sink, table.notes
        f.N_is = N_is
    return fit


def in_active_params(table: RunsTable) -> tuple[RunsTable, str]:
    """MoE runs (N_active < N): the loss law is fitted in ACTIVE N, the parameters a token pays for, so that
    C = 6 N D holds and the compute-optimal split is in what compute buys (total N stays in N_total). One
    expert layout per fit: dense and MoE runs, or two layouts, follow different laws."""
    if "N_active" not in table:
        return table, "N"
    N, Na = table["N"], table["N_active"]
    moe = np.isfinite(Na) & (Na < N)
    if not moe.any():
        return table, "N"
    unknown = np.full(len(table), np.nan)
    layouts = {f"{e:g}/{k:g}" for e, k in zip(table.data.get("n_experts", unknown), table.data.get("top_k", unknown))}
    if not moe.all() or len(layouts) > 1:
        raise FitError(f"{table.source} mixes dense and MoE runs or several expert layouts ({int(moe.sum())} of "
                       f"{len(table)} runs are MoE); a law holds for one layout: add --where n_experts=E")
    data = {**table.data, "N": Na, "N_total": N}
    ratio = float(np.median(N / Na))
    note = (f"MoE runs: the law is fitted in ACTIVE non-embedding N (C = 6 N_active D); total N is "
            f"~{ratio:.2f}x larger")
    return RunsTable(data, table.source, table.adapter, table.notes + [note]), "N_active"
