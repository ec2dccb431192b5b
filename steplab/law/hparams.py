"""Step Law (StepFun, "Predictable Scale: Part I", arXiv 2503.04715): optimal peak lr and batch size.

    lr(N, D)         = exp(lr_intercept) * N^lr_coef_N * D^lr_coef_D     (N non-embedding params, D tokens)
    batch_tokens(D)  = exp(bs_intercept) * D^bs_coef_D

The published coefficients come from ~3,700 runs. ``fit_hparam_laws`` repeats their procedure on a sweep:
keep the runs within 0.25% of their (N, D) cell's best smoothed loss (the loss surface is a broad plateau,
so the near-best runs, not the single best, locate the optimum), regress log lr and log batch by least
squares, and average 1000 bootstrap resamples of the kept runs, as Step Law's fit_tool does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from steplab.errors import FitError
from steplab.law.tables import RunsTable


@dataclass(frozen=True)
class HparamCoefs:
    lr_intercept: float
    lr_coef_N: float
    lr_coef_D: float
    bs_intercept: float
    bs_coef_D: float

    def lr(self, N, D):
        return np.exp(self.lr_intercept) * np.asarray(N, float) ** self.lr_coef_N * np.asarray(D, float) ** self.lr_coef_D

    def batch_tokens(self, D):
        return np.exp(self.bs_intercept) * np.asarray(D, float) ** self.bs_coef_D


# lr = 1.79 N^-0.713 D^0.307, B = 0.58 D^0.571 (the means of their 1000 bootstrap fits).
PUBLISHED = HparamCoefs(math.log(1.79), -0.713, 0.307, math.log(0.58), 0.571)
COEF_NAMES = ("lr_coef_N", "lr_coef_D", "lr_intercept", "bs_coef_D", "bs_intercept")


def step_law_lr(N: float, D: float, coefs: HparamCoefs | None = None) -> float:
    """Optimal peak learning rate for N non-embedding parameters trained on D tokens."""
    _check_positive(N=N, D=D)
    return float((coefs or PUBLISHED).lr(N, D))


def step_law_batch_tokens(D: float, coefs: HparamCoefs | None = None) -> float:
    """Optimal batch size in tokens for D training tokens."""
    _check_positive(D=D)
    return float((coefs or PUBLISHED).batch_tokens(D))


def suggest(N: float, D: float, seq_len: int = 2048, coefs: HparamCoefs | None = None) -> dict:
    """lr, batch in tokens and in whole sequences (at least one) for a run of N params on D tokens."""
    _check_positive(N=N, D=D, seq_len=seq_len)
    lr = step_law_lr(N, D, coefs)
    tokens = step_law_batch_tokens(D, coefs)
    return {"lr": lr, "batch_tokens": tokens, "batch_sequences": max(1, int(round(tokens / seq_len)))}


def _check_positive(**values: float) -> None:
    for name, v in values.items():
        if not (isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(v) and v > 0):
            raise FitError(f"Step Law: {name} = {v!r} must be a positive finite number (e.g. --N 1e9 --D 2e10)")


# ---------------------------------------------------------------------------------------- fitting

def cell_ids(table: RunsTable, n_key: str | None = None, rel: float = 0.02) -> np.ndarray:
    """Integer id of each run's (N, D) cell; MoE cells are told apart by active N (two expert layouts
    can share a total N). Values within ``rel`` of each other are one cell: a sweep's D is steps x batch
    tokens, so the batches of one cell give Ds a fraction of a batch apart (499,712 and 500,224 for 0.5M)."""
    n_key = n_key or ("N_active" if "N_active" in table else "N")
    ids = np.stack([_group(table[n_key], rel), _group(table["D"], rel)], 1)
    return np.unique(ids, axis=0, return_inverse=True)[1].ravel()


def _group(values: np.ndarray, rel: float) -> np.ndarray:
    """Group ids of sorted values, a new group wherever the next value is more than ``rel`` above the last."""
    order = np.argsort(values, kind="stable")
    v = np.log(np.asarray(values, float)[order])
    ids = np.empty(len(v), dtype=int)
    ids[order] = np.concatenate([[0], np.cumsum(np.diff(v) > np.log1p(rel))]) if len(v) else []
    return ids


def select_near_best(table: RunsTable, tolerance: float = 0.0025, n_key: str | None = None) -> np.ndarray:
    """Runs whose loss is within ``tolerance`` (relative) of the best loss of their (N, D) cell."""
    loss, cells = table["loss"], cell_ids(table, n_key)
    best = np.full(cells.max() + 1, np.inf)
    np.minimum.at(best, cells, loss)
    return np.abs(loss / best[cells] - 1) < tolerance


def _check_design(logN: np.ndarray, logD: np.ndarray) -> None:
    """The exponents are only identified if N and D each vary, and not in lockstep."""
    from steplab.law.fit import MIN_SPAN
    if len(logN) < 4:
        raise FitError(f"hyperparameter fit: {len(logN)} selected runs for 3 lr coefficients; sweep more cells")
    for name, v, hint in (("N", logN, "MoE sweeps at one total size: --map N=<active-params column>, e.g. Na"), ("D", logD, "")):
        span = float(np.exp(np.ptp(v)))
        if span < MIN_SPAN:
            raise FitError(f"hyperparameter fit: {name} spans only x{span:.4g} across the selected runs, so the lr "
                           f"exponent on {name} cannot be fitted; sweep {name} over x{MIN_SPAN:g} or more"
                           + (f" ({hint})" if hint else ""))
    corr = abs(np.corrcoef(logN, logD)[0, 1])
    if corr > 0.98:
        raise FitError(f"hyperparameter fit: log N and log D move together (|corr| = {corr:.3f}, e.g. a fixed "
                       "tokens-per-parameter ratio), so their lr exponents cannot be separated; vary D at fixed N")


def _batched_lstsq(X: np.ndarray, y: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares on every resample at once: normal equations (B, k, k) solved in one call. Columns are
    centred first, so the systems are well conditioned; singular resamples come back as NaN rows."""
    Xb, yb = X[idx], y[idx]
    XtX = np.einsum("bni,bnj->bij", Xb, Xb)
    Xty = np.einsum("bni,bn->bi", Xb, yb)
    good = np.linalg.cond(XtX) < 1e10
    coef = np.full((len(idx), X.shape[1]), np.nan)
    if good.any():
        coef[good] = np.linalg.solve(XtX[good], Xty[good][..., None])[..., 0]
    return coef, good


@dataclass
class HparamFit:
    coefs: HparamCoefs             # Step Law's estimate: mean of the bootstrap fits (full-sample without bootstrap)
    full_sample: HparamCoefs       # plain least squares on all selected runs
    boot: np.ndarray | None        # (n_bootstrap, 5) in COEF_NAMES order; failed resamples dropped
    n_runs: int
    n_selected: int
    n_cells: int
    rmse_log_lr: float
    rmse_log_bs: float
    tolerance: float
    cells: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kind: str = "hparams"

    def to_dict(self) -> dict:
        from steplab.law.fit import summarise
        d: dict = {"kind": self.kind}
        for i, name in enumerate(COEF_NAMES):
            est = summarise(getattr(self.coefs, name), None if self.boot is None else self.boot[:, i])
            d[name], d[f"{name}_sd"], d[f"{name}_ci"] = est.value, est.se, list(est.ci)
        d["lr_prefactor"], d["bs_prefactor"] = math.exp(self.coefs.lr_intercept), math.exp(self.coefs.bs_intercept)
        d["quality"] = {"runs": self.n_runs, "selected": self.n_selected, "cells": self.n_cells,
                        "tolerance": self.tolerance, "rmse_log_lr": self.rmse_log_lr,
                        "rmse_log_bs": self.rmse_log_bs, "bootstrap": 0 if self.boot is None else len(self.boot)}
        d["cells"], d["warnings"], d["notes"] = self.cells, self.warnings, self.notes
        return d


def fit_hparam_laws(table: RunsTable, *, tolerance: float = 0.0025, seq_len: int = 2048,
                    n_bootstrap: int = 1000, seed: int = 0) -> HparamFit:
    """Fit lr(N, D) and batch_tokens(D) from an lr x batch sweep, Step Law's way (see module docstring).
    ``table["loss"]`` should be a smoothed final training loss (the steplaw adapter maps "smooth loss")."""
    from steplab.law.fit import _warn, check_points
    table.require("N", "D", "loss", "lr")
    batch = table["batch_tokens"] if "batch_tokens" in table else table["batch_sequences"] * seq_len
    check_points("hyperparameter fit", N=table["N"], D=table["D"], loss=table["loss"], lr=table["lr"],
                 batch_tokens=batch)
    sink: list[str] = []
    keep = select_near_best(table, tolerance)
    cells = cell_ids(table)
    logN, logD = np.log(table["N"][keep]), np.log(table["D"][keep])
    y_lr, y_bs = np.log(table["lr"][keep]), np.log(batch[keep])
    n_cells = len(np.unique(cells))

    # Centred designs: lr on (log N, log D, 1), batch on (log D, 1).
    mN, mD = logN.mean(), logD.mean()
    X_lr = np.stack([logN - mN, logD - mD, np.ones_like(logN)], 1)
    X_bs = X_lr[:, 1:]
    _check_design(logN, logD)

    def unpack(c_lr, c_bs) -> np.ndarray:
        # back from centred columns: intercept = c0 - cN mN - cD mD
        return np.stack([c_lr[:, 0], c_lr[:, 1], c_lr[:, 2] - c_lr[:, 0] * mN - c_lr[:, 1] * mD,
                         c_bs[:, 0], c_bs[:, 1] - c_bs[:, 0] * mD], 1)

    all_rows = np.arange(len(logN))[None, :]
    full = unpack(_batched_lstsq(X_lr, y_lr, all_rows)[0], _batched_lstsq(X_bs, y_bs, all_rows)[0])[0]
    boot = None
    estimate = full
    if n_bootstrap:
        idx = np.random.default_rng(seed).integers(0, len(logN), (n_bootstrap, len(logN)))
        c_lr, ok_lr = _batched_lstsq(X_lr, y_lr, idx)
        c_bs, ok_bs = _batched_lstsq(X_bs, y_bs, idx)
        ok = ok_lr & ok_bs
        if ok.mean() < 0.99:
            _warn(sink, f"{int((~ok).sum())} of {n_bootstrap} bootstrap resamples were degenerate and dropped")
        boot = unpack(c_lr[ok], c_bs[ok])
        estimate = boot.mean(axis=0)

    coefs = HparamCoefs(*(float(estimate[COEF_NAMES.index(k)]) for k in
                          ("lr_intercept", "lr_coef_N", "lr_coef_D", "bs_intercept", "bs_coef_D")))
    full_coefs = HparamCoefs(*(float(full[i]) for i in (2, 0, 1, 4, 3)))
    res_lr = y_lr - np.log(coefs.lr(np.exp(logN), np.exp(logD)))
    res_bs = y_bs - np.log(coefs.batch_tokens(np.exp(logD)))
    if len(np.unique(table["N"])) < 3:
        _warn(sink, "only 2 model sizes: the lr exponent on N rests on two points")
    if boot is not None:
        for name in ("lr_coef_N", "lr_coef_D", "bs_coef_D"):
            col = boot[:, COEF_NAMES.index(name)]
            lo, hi = np.percentile(col, [2.5, 97.5])
            if hi - lo > abs(col.mean()):
                _warn(sink, f"{name} is poorly determined: its 95% bootstrap interval [{lo:.3g}, {hi:.3g}] "
                            "is wider than its size")
    fit = HparamFit(coefs, full_coefs, boot, len(table), int(keep.sum()), n_cells,
                    float(np.sqrt(np.mean(res_lr ** 2))), float(np.sqrt(np.mean(res_bs ** 2))), tolerance,
                    cells=_cell_summary(table, keep, batch, cells), warnings=sink)
    return fit


def _cell_summary(table: RunsTable, keep: np.ndarray, batch: np.ndarray, cells: np.ndarray) -> list[dict]:
    out = []
    for c in np.unique(cells):
        m = cells == c
        i = np.flatnonzero(m)[np.argmin(table["loss"][m])]
        out.append({"N": float(table["N"][i]), **({"N_active": float(table["N_active"][i])} if "N_active" in table
                                                     else {}),
                    "D": float(table["D"][i]), "runs": int(m.sum()),
                    "selected": int((m & keep).sum()), "best_loss": float(table["loss"][i]),
                    "best_lr": float(table["lr"][i]), "best_batch_tokens": float(batch[i])})
    return out


def lr_law_residuals(table: RunsTable, coefs: HparamCoefs, n_key: str = "N",
                     tolerance: float = 0.0025) -> dict:
    """How far a law's lr sits from the near-best runs of each cell, with N read from ``n_key``
    (e.g. total ``N`` vs ``N_active`` for MoE). Residuals are log(lr_run) - log(lr_law), so +0.69 means the
    runs wanted twice the law's lr."""
    keep = select_near_best(table, tolerance)
    r = np.log(table["lr"][keep]) - np.log(coefs.lr(table[n_key][keep], table["D"][keep]))
    cells = cell_ids(table)[keep]
    per_cell = np.array([r[cells == c].mean() for c in np.unique(cells)])
    return {"n_key": n_key, "mean": float(r.mean()), "rmse": float(np.sqrt(np.mean(r ** 2))),
            "cell_rmse": float(np.sqrt(np.mean(per_cell ** 2))), "per_cell": per_cell.tolist()}
