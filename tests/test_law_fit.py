"""Loss scaling-law fits: Epoch's refit reproduced, synthetic recovery, IsoFLOP, tables, robustness, CLI."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from steplab.cli import main
from steplab.errors import DataError, FitError
from steplab.law.fit import FitWarning, fit_parametric, fit_table
from steplab.law.isoflop import fit_isoflop
from steplab.law.tables import best_per_cell, load_table, table_from_columns


def shared() -> Path:
    return Path(os.environ.get("STEPLAB_SHARED") or Path(__file__).resolve().parents[2] / "shared")


def shared_file(rel: str) -> Path:
    path = shared() / rel
    if not path.exists():
        pytest.skip(f"{path} not available (set STEPLAB_SHARED to the shared directory)")
    return path


EPOCH = "data/chinchilla_epoch/epoch_chinchilla_NDL.csv"
TRUE = dict(E=1.7, A=400.0, B=1500.0, alpha=0.34, beta=0.30)


def synthetic(noise: float = 0.002, seed: int = 1, sizes: int = 6, budgets: int = 6):
    """Loss from a known law on a sizes x budgets grid, with multiplicative noise."""
    rng = np.random.default_rng(seed)
    N = np.repeat(np.logspace(7, 9.5, sizes), budgets)
    D = np.tile(np.logspace(8, 11.5, budgets), sizes)
    L = TRUE["E"] + TRUE["A"] / N ** TRUE["alpha"] + TRUE["B"] / D ** TRUE["beta"]
    return N, D, L * np.exp(rng.normal(0, noise, len(N)))


# ---------------------------------------------------------------------------------- reproduction

def test_epoch_refit_reproduced():
    """Epoch's 240 points: E, alpha, beta within their bootstrap standard errors of their published fit."""
    table = load_table(shared_file(EPOCH))
    assert len(table) == 240 and table.adapter == "epoch"
    fit = fit_table(table, "chinchilla", n_bootstrap=100, seed=0)
    assert abs(fit.E - 1.817) < 0.026
    assert abs(fit.alpha - 0.348) < 0.015
    assert abs(fit.beta - 0.366) < 0.021
    assert fit.objective == pytest.approx(0.00101827, rel=1e-4)  # the optimum Epoch's own grid search prints
    est = fit.estimates()
    for name, published in (("E", 1.817), ("alpha", 0.348), ("beta", 0.366)):
        lo, hi = est[name].ci
        assert lo < published < hi
    assert 0.01 < est["alpha"].se < 0.025  # Epoch: 0.015


def test_epoch_optimum_same_with_lbfgsb():
    """Hoffmann's minimiser (L-BFGS-B) and our default (BFGS) find the same optimum from the same starts."""
    t = load_table(shared_file(EPOCH))
    a = fit_parametric(t["N"], t["D"], t["loss"], n_bootstrap=0, n_starts=16, method="L-BFGS-B")
    b = fit_parametric(t["N"], t["D"], t["loss"], n_bootstrap=0, n_starts=16)
    assert a.objective == pytest.approx(b.objective, rel=1e-6)
    assert (a.E, a.alpha, a.beta) == pytest.approx((b.E, b.alpha, b.beta), abs=1e-4)


def test_epoch_raw_svg_derives_D_like_epoch():
    """The upstream SVG table has N and C only: D must come out as C / (6 N), and 5 outliers dropped."""
    t = load_table(shared_file("data/chinchilla_epoch/svg_extracted_data.csv"))
    assert len(t) == 240
    np.testing.assert_allclose(t["D"], t["C"] / (6 * t["N"]))


def test_synthetic_recovery():
    N, D, L = synthetic()
    fit = fit_parametric(N, D, L, n_bootstrap=30, seed=0)
    assert fit.E == pytest.approx(TRUE["E"], abs=0.03)
    assert fit.alpha == pytest.approx(TRUE["alpha"], abs=0.02)
    assert fit.beta == pytest.approx(TRUE["beta"], abs=0.02)
    assert fit.A == pytest.approx(TRUE["A"], rel=0.3) and fit.B == pytest.approx(TRUE["B"], rel=0.3)
    assert fit.rmse_log < 0.005 and not fit.warnings


def test_holdout_predicts_largest_compute_runs():
    N, D, L = synthetic()
    fit = fit_parametric(N, D, L, n_bootstrap=30, seed=0, holdout=3)
    assert fit.n == len(N) - 3 and len(fit.holdout) == 3
    largest = np.sort(6 * N * D)[-3:]
    assert sorted(h["C"] for h in fit.holdout) == pytest.approx(list(largest))
    for h in fit.holdout:
        assert abs(h["rel_err"]) < 0.01
        assert h["predicted_ci"][0] <= h["predicted"] <= h["predicted_ci"][1]


def test_deterministic_for_a_seed():
    N, D, L = synthetic()
    a = fit_parametric(N, D, L, n_bootstrap=20, seed=7)
    b = fit_parametric(N, D, L, n_bootstrap=20, seed=7)
    assert a.to_dict() == b.to_dict()
    np.testing.assert_array_equal(a.boot, b.boot)


# ------------------------------------------------------------------------------------ robustness

@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0, 0.0])
def test_invalid_values_fail_clearly(bad):
    N, D, L = synthetic()
    L[4] = bad
    with pytest.raises(FitError, match="loss.*--drop-invalid"):
        fit_parametric(N, D, L, n_bootstrap=0)


def test_drop_invalid_warns_and_fits():
    N, D, L = synthetic()
    L[3], N[5] = np.nan, -5
    table = table_from_columns({"N": N, "D": D, "loss": L})
    with pytest.raises(FitError, match="2 of 36 runs"):
        fit_table(table, "chinchilla", n_bootstrap=0)
    with pytest.warns(FitWarning, match="dropped 2 runs"):
        fit = fit_table(table, "chinchilla", n_bootstrap=0, drop_invalid=True)
    assert fit.n == 34 and fit.warnings


def test_fewer_points_than_parameters():
    N, D, L = synthetic()
    with pytest.raises(FitError, match="4 runs for 5 parameters"):
        fit_parametric(N[:4], D[:4], L[:4], n_bootstrap=0)


def test_all_N_equal_is_unidentifiable():
    N, D, L = synthetic()
    with pytest.raises(FitError, match="alpha cannot be separated"):
        fit_parametric(np.full_like(N, 1e8), D, L, n_bootstrap=0)
    with pytest.raises(FitError, match="beta"):  # three distinct but nearly equal D: still no signal
        fit_parametric(N, 1e9 * (1 + np.arange(len(D)) % 3 * 1e-3), L, n_bootstrap=0)


def test_holdout_must_leave_enough_runs():
    N, D, L = synthetic()
    with pytest.raises(FitError, match="holdout"):
        fit_parametric(N, D, L, holdout=len(N) - 3, n_bootstrap=0)


def test_edge_exponent_warns():
    """Loss that does not depend on D at all: beta runs off to an edge and the fit says so."""
    N, D, _ = synthetic()
    L = 1.7 + 400 / N ** 0.34
    with pytest.warns(FitWarning):
        fit = fit_parametric(N, D, L, n_bootstrap=20)
    assert any("beta" in w for w in fit.warnings)


# --------------------------------------------------------------------------------------- IsoFLOP

def isoflop_synthetic(levels=4, seed=0):
    rng = np.random.default_rng(seed)
    a = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    rows = []
    for C in np.logspace(18, 21, levels):
        n_opt = 0.1 * (C / 6) ** a  # roughly centred; the parabola finds the true vertex
        for k in np.linspace(-1.2, 1.2, 7):
            n = n_opt * np.exp(k)
            rows.append((n, C / (6 * n), C))
    N, D, C = map(np.array, zip(*rows))
    L = TRUE["E"] + TRUE["A"] / N ** TRUE["alpha"] + TRUE["B"] / D ** TRUE["beta"]
    return N, D, C, L * np.exp(rng.normal(0, 0.001, len(N)))


def test_isoflop_approach2_recovers_allocation_exponent():
    N, D, C, L = isoflop_synthetic()
    fit = fit_isoflop(N, D, L, C=C, approach=2, n_bootstrap=50)
    expected = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    assert fit.a.value == pytest.approx(expected, abs=0.03)
    assert fit.a.value + fit.b.value == pytest.approx(1.0, abs=1e-6)  # C = 6 N D exactly
    assert fit.a.ci[0] < fit.a.value < fit.a.ci[1]
    env = fit_isoflop(N, D, L, C=C, approach=1, n_bootstrap=0)
    assert env.a.value == pytest.approx(expected, abs=0.1)  # grid-limited: one of 7 sizes per level


def test_isoflop_single_compute_level_fails():
    N, D, C, L = isoflop_synthetic()
    one = C == C.max()
    with pytest.raises(FitError, match="1 usable compute level"):
        fit_isoflop(N[one], D[one], L[one], C=C[one], n_bootstrap=0)


def test_isoflop_open_athena_chinchilla():
    table = load_table(shared_file("data/scaling_laws/open_athena_isoflops/isoflops_transform.csv"),
                       where={"experiment": "epochai_chinchilla__massivetext__chinchilla"})
    a1, a2 = fit_table(table, "isoflop", n_bootstrap=50)
    assert 0.45 < a2.a.value < 0.6 and 0.4 < a1.a.value < 0.6  # Chinchilla: a near 0.5


# ---------------------------------------------------------------------------------------- tables

@pytest.mark.parametrize("rel,adapter,rows", [
    ("data/scaling_laws/steplaw/dense_lr_bs_loss.csv", "steplaw", 1911),
    ("data/scaling_laws/steplaw/moe_lr_bs_loss.csv", "steplaw", 708),
    ("data/scaling_laws/gadre_overtraining/gadre_models_flat.csv", "gadre", 104),
    ("data/scaling_laws/gadre_overtraining/models", "gadre", 104),
    ("data/scaling_laws/misfitting/scaling_results.csv", "misfitting", 261),
    ("data/scaling_laws/misfitting/scaling_results_last_ckpt_only.csv", "misfitting", 261),
    ("data/scaling_laws/open_athena_isoflops/isoflops_extract.csv", "open_athena", 947),
    ("data/scaling_laws/open_athena_isoflops/isoflops_transform.csv", "open_athena", 750),
])
def test_every_shared_format_loads(rel, adapter, rows):
    t = load_table(shared_file(rel))
    assert t.adapter == adapter and len(t) == rows
    assert not t.invalid("N", "D", "loss").any()


def test_gadre_json_dir_matches_flat_csv():
    a = load_table(shared_file("data/scaling_laws/gadre_overtraining/models"))
    b = load_table(shared_file("data/scaling_laws/gadre_overtraining/gadre_models_flat.csv"))
    order_a, order_b = np.argsort(a["label"]), np.argsort(b["label"])
    np.testing.assert_allclose(a["loss"][order_a], b["loss"][order_b])


def test_mixed_datasets_refused_then_where():
    path = shared_file("data/scaling_laws/gadre_overtraining/gadre_models_flat.csv")
    with pytest.raises(FitError, match="--where dataset="):
        fit_table(load_table(path), "chinchilla", n_bootstrap=0)
    fit = fit_table(load_table(path, where={"dataset": "rpj"}, columns={"loss": "loss_openlm"}),
                    "chinchilla", n_bootstrap=0)
    assert fit.n == 35 and 0 < fit.alpha < 2 and fit.kind == "chinchilla"


def test_our_runs_table_csv_and_jsonl(tmp_path):
    N, D, L = synthetic()
    csv_path = tmp_path / "runs.csv"
    csv_path.write_text("n_params,tokens,val_loss,name\n" + "".join(
        f"{n},{d},{l},run{i}\n" for i, (n, d, l) in enumerate(zip(N, D, L))))
    jsonl_path = tmp_path / "runs.jsonl"
    jsonl_path.write_text("".join(json.dumps({"N": n, "D": d, "loss": l}) + "\n" for n, d, l in zip(N, D, L)))
    a, b = load_table(csv_path), load_table(jsonl_path)
    assert a.adapter == b.adapter == "runs"
    np.testing.assert_allclose(a["loss"], b["loss"])
    np.testing.assert_allclose(a["C"], 6 * N * D)
    mapped = load_table(csv_path, columns={"N": "tokens", "D": "n_params"})
    np.testing.assert_allclose(mapped["N"], D)


def test_table_errors(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("N,D,loss\n1e6,1e8,abc\n2e6,1e8,3.0\n")
    with pytest.raises(DataError, match="'loss' is not numeric"):
        load_table(p)
    p.write_text("N,D,loss\n1e6,1e8,3.1\n")
    with pytest.raises(DataError, match="--map N=nope: no such column"):
        load_table(p, columns={"N": "nope"})
    with pytest.raises(DataError, match="no column for 'lr'"):
        load_table(p)["lr"]
    with pytest.raises(DataError, match="unknown adapter"):
        load_table(p, adapter="bogus")


def test_best_per_cell_keeps_lowest_loss():
    t = table_from_columns({"N": [1, 1, 2], "D": [5, 5, 5], "loss": [3.0, 2.0, 4.0]})
    best, merged = best_per_cell(t)
    assert merged == 1 and sorted(best["loss"].tolist()) == [2.0, 4.0]


# ------------------------------------------------------------------------------------------- CLI

def test_cli_fit_epoch_json(capsys):
    rc = main(["law", "fit", str(shared_file(EPOCH)), "--json", "--bootstrap", "30"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("E", "A", "B", "alpha", "beta"):
        assert isinstance(out[key], float) and len(out[f"{key}_ci"]) == 2
    assert abs(out["alpha"] - 0.348) < 0.015 and out["quality"]["n"] == 240


def test_cli_fit_bad_table(tmp_path, capsys):
    p = tmp_path / "bad.csv"
    p.write_text("N,D,loss\n1e6,1e8,nan\n2e6,2e8,3.0\n4e6,4e8,2.9\n")
    assert main(["law", "fit", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--drop-invalid" in err and len(err.strip().splitlines()) == 1
    assert main(["law", "fit", str(tmp_path / "missing.csv")]) == 2
    assert "no such table" in capsys.readouterr().err


def test_cli_fit_and_report_synthetic(tmp_path, capsys):
    N, D, L = synthetic()
    p = tmp_path / "runs.csv"
    p.write_text("N,D,loss\n" + "".join(f"{n},{d},{l}\n" for n, d, l in zip(N, D, L)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CLI prints warnings itself, never via Python's machinery
        assert main(["law", "fit", str(p), "--holdout", "2", "--bootstrap", "20", "--plots", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and "holdout" in out
    assert (tmp_path / "loss_vs_compute.png").stat().st_size > 1000
    assert main(["law", "report", str(p), "--bootstrap", "10", "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "fitted_vs_measured.png" in md and (tmp_path / "rep" / "report.html").exists()
