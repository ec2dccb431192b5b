"""Step Law: published formula, the fit procedure reproduced on the released runs, robustness, CLI."""
from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from steplab.cli import main
from steplab.errors import FitError
from steplab.law.fit import fit_table
from steplab.law.hparams import (PUBLISHED, HparamCoefs, fit_hparam_laws, lr_law_residuals, select_near_best,
                                 step_law_batch_tokens, step_law_lr, suggest)
from steplab.law.tables import load_table, table_from_columns


def shared_file(rel: str) -> Path:
    root = Path(os.environ.get("STEPLAB_SHARED") or Path(__file__).resolve().parents[2] / "shared")
    if not (root / rel).exists():
        pytest.skip(f"{root / rel} not available (set STEPLAB_SHARED to the shared directory)")
    return root / rel


DENSE = "data/scaling_laws/steplaw/dense_lr_bs_loss.csv"
MOE = "data/scaling_laws/steplaw/moe_lr_bs_loss.csv"
TRUE = HparamCoefs(lr_intercept=1.0, lr_coef_N=-0.7, lr_coef_D=0.3, bs_intercept=-0.5, bs_coef_D=0.55)


def synthetic_sweep(Ns=(1e8, 3e8, 1e9), Ds=(2e9, 8e9, 3e10), coefs=TRUE):
    """An lr x batch grid per (N, D) cell with a convex bowl in (log lr, log batch) around the true optimum."""
    rows = []
    for N, D in itertools.product(Ns, Ds):
        base = 2.0 + 50 / N ** 0.3 + 300 / D ** 0.3
        lr_opt, bs_opt = float(coefs.lr(N, D)), float(coefs.batch_tokens(D))
        for k_lr, k_bs in itertools.product(range(-6, 7), range(-4, 5)):
            lr, bs = lr_opt * 2 ** (k_lr / 2 + 0.13), bs_opt * 2 ** (k_bs + 0.21)  # grid not centred on the optimum
            loss = base * (1 + 0.01 * math.log(lr / lr_opt) ** 2 + 0.005 * math.log(bs / bs_opt) ** 2)
            rows.append((N, D, lr, bs, loss))
    N, D, lr, bs, loss = map(np.array, zip(*rows))
    return table_from_columns({"N": N, "D": D, "lr": lr, "batch_tokens": bs, "loss": loss})


# ---------------------------------------------------------------------------------- the formula

def test_published_formula():
    N, D = 1e9, 1e11
    assert step_law_lr(N, D) == pytest.approx(1.79 * N ** -0.713 * D ** 0.307, rel=1e-12)
    assert step_law_batch_tokens(D) == pytest.approx(0.58 * D ** 0.571, rel=1e-12)
    s = suggest(N, D, seq_len=4096)
    assert s["batch_sequences"] == round(0.58 * D ** 0.571 / 4096)
    assert suggest(1e6, 1e3)["batch_sequences"] == 1  # never a zero batch


def test_published_constants_match_their_bootstrap_file():
    """The rounded published law is the mean of Step Law's own 1000 bootstrap fits."""
    import csv

    rows = list(csv.DictReader(open(shared_file("data/scaling_laws/steplaw/1004_fitted_lr_bs_scaling_model_parameters.csv"))))
    mean = {k: np.mean([float(r[k]) for r in rows]) for k in rows[0]}
    assert mean["lr_coefN"] == pytest.approx(PUBLISHED.lr_coef_N, abs=5e-4)
    assert mean["lr_coefD"] == pytest.approx(PUBLISHED.lr_coef_D, abs=5e-4)
    assert mean["bs_coefD"] == pytest.approx(PUBLISHED.bs_coef_D, abs=5e-4)
    assert math.exp(mean["lr_intercept"]) == pytest.approx(1.79, abs=0.01)
    assert math.exp(mean["bs_intercept"]) == pytest.approx(0.58, abs=0.01)


@pytest.mark.parametrize("N,D", [(-1, 1e9), (1e9, 0), (float("nan"), 1e9), (1e9, float("inf"))])
def test_formula_rejects_nonsense(N, D):
    with pytest.raises(FitError, match="positive finite"):
        suggest(N, D)


# --------------------------------------------------------------------------- the fit procedure

def test_steplaw_dense_reproduced():
    """Released dense runs: within 0.03 of -0.765 / 0.197 / 0.612, with 1000-resample bootstrap sd."""
    table = load_table(shared_file(DENSE))
    fit = fit_hparam_laws(table, n_bootstrap=1000, seed=0)
    d = fit.to_dict()
    assert fit.n_selected == 129 and fit.n_cells == 17 and len(fit.boot) == 1000
    assert d["lr_coef_N"] == pytest.approx(-0.765, abs=0.03)
    assert d["lr_coef_D"] == pytest.approx(0.197, abs=0.03)
    assert d["bs_coef_D"] == pytest.approx(0.612, abs=0.03)
    assert d["lr_coef_N_sd"] == pytest.approx(0.05, abs=0.015)
    assert d["lr_coef_D_sd"] == pytest.approx(0.034, abs=0.01)
    assert d["bs_coef_D_sd"] == pytest.approx(0.038, abs=0.01)
    for name in ("lr_coef_N", "lr_coef_D", "bs_coef_D"):
        lo, hi = d[f"{name}_ci"]
        assert lo < d[name] < hi
    assert d["quality"]["rmse_log_lr"] < 0.5


def test_smoothed_loss_is_used():
    t = load_table(shared_file(DENSE))
    assert "loss_raw" in t and not np.allclose(t["loss"], t["loss_raw"])  # "smooth loss" column, not "loss"
    np.testing.assert_allclose(t["batch_tokens"], t["batch_sequences"] * 2048)


def test_auto_kind_detects_sweep():
    fit = fit_table(load_table(shared_file(DENSE)), n_bootstrap=10)
    assert fit.kind == "hparams"


def test_synthetic_sweep_recovered():
    fit = fit_hparam_laws(synthetic_sweep(), n_bootstrap=200, seed=0)
    c = fit.coefs
    assert c.lr_coef_N == pytest.approx(TRUE.lr_coef_N, abs=0.05)
    assert c.lr_coef_D == pytest.approx(TRUE.lr_coef_D, abs=0.05)
    assert c.bs_coef_D == pytest.approx(TRUE.bs_coef_D, abs=0.05)
    assert not fit.warnings


def test_selection_rule():
    t = table_from_columns({"N": [1, 1, 1, 2], "D": [1, 1, 1, 1], "loss": [2.0, 2.004, 2.006, 9.0],
                            "lr": [1, 2, 3, 4], "batch_tokens": [1, 1, 1, 1]})
    assert select_near_best(t).tolist() == [True, True, False, True]


def test_deterministic_for_a_seed():
    t = synthetic_sweep()
    a, b = fit_hparam_laws(t, seed=3), fit_hparam_laws(t, seed=3)
    np.testing.assert_array_equal(a.boot, b.boot)
    assert a.to_dict() == b.to_dict()
    assert fit_hparam_laws(t, seed=4).to_dict() != a.to_dict()


def test_single_model_size_unidentifiable():
    with pytest.raises(FitError, match="N spans only"):
        fit_hparam_laws(synthetic_sweep(Ns=(3e8,)), n_bootstrap=10)


def test_N_and_D_in_lockstep_unidentifiable():
    cells = [synthetic_sweep(Ns=(n,), Ds=(20 * n,)) for n in (1e8, 3e8, 1e9)]
    t = table_from_columns({k: np.concatenate([c[k] for c in cells]) for k in ("N", "D", "lr", "batch_tokens", "loss")})
    with pytest.raises(FitError, match="move together"):
        fit_hparam_laws(t, n_bootstrap=10)


def test_invalid_rows():
    t = synthetic_sweep()
    t.data["lr"][5] = np.nan
    with pytest.raises(FitError, match="lr.*--drop-invalid"):
        fit_table(t, "hparams", n_bootstrap=10)
    with pytest.warns(UserWarning, match="dropped 1 runs"):
        fit = fit_table(t, "hparams", n_bootstrap=10, drop_invalid=True)
    assert fit.n_runs == len(t) - 1


# ------------------------------------------------------------------------------------------- MoE

def test_moe_total_N_predicts_lr_better_than_active():
    moe = load_table(shared_file(MOE))
    with pytest.raises(FitError, match="N spans only"):  # total N is ~2.15e9 in every MoE run
        fit_hparam_laws(moe, n_bootstrap=10)
    total = lr_law_residuals(moe, PUBLISHED, "N")
    active = lr_law_residuals(moe, PUBLISHED, "N_active")
    assert abs(total["mean"]) < 0.3 and active["mean"] < -0.8
    assert total["cell_rmse"] < active["cell_rmse"] / 3


# ------------------------------------------------------------------------------------------- CLI

def test_cli_hparams_json(capsys):
    assert main(["law", "hparams", "--N", "1e9", "--D", "1e11", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["lr"] == pytest.approx(1.79 * 1e9 ** -0.713 * 1e11 ** 0.307, rel=1e-12)
    assert out["batch_tokens"] == pytest.approx(0.58 * 1e11 ** 0.571, rel=1e-12)
    assert out["batch_sequences"] == round(out["batch_tokens"] / 2048)


def test_cli_hparams_text_and_errors(capsys):
    assert main(["law", "hparams", "--N", "1e9", "--D", "1e11", "--seq-len", "4096"]) == 0
    assert "sequences of 4096" in capsys.readouterr().out
    assert main(["law", "hparams", "--N", "-5", "--D", "1e11"]) == 2
    assert "positive finite" in capsys.readouterr().err


def test_cli_hparams_from_table(tmp_path, capsys):
    t = synthetic_sweep()
    p = tmp_path / "sweep.csv"
    p.write_text("N,D,lr,batch_tokens,loss\n" + "".join(
        ",".join(repr(float(t[k][i])) for k in ("N", "D", "lr", "batch_tokens", "loss")) + "\n" for i in range(len(t))))
    assert main(["law", "hparams", "--N", "5e8", "--D", "1e10", "--from", str(p), "--json", "--bootstrap", "50"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["lr"] == pytest.approx(float(TRUE.lr(5e8, 1e10)), rel=0.15)


def test_cli_fit_hparams_json(capsys):
    assert main(["law", "fit", str(shared_file(DENSE)), "--json", "--bootstrap", "200"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("lr_coef_N", "lr_coef_D", "lr_intercept", "bs_coef_D", "bs_intercept"):
        assert len(out[f"{key}_ci"]) == 2
    assert out["lr_coef_N"] == pytest.approx(-0.765, abs=0.03)


def test_cells_group_ds_that_differ_by_batch_rounding():
    """A sweep's D is steps x batch tokens: one 0.5M cell holds 499,712 (batch 1,024) and 500,224 (batch 512).
    They are one cell for the selection rule; 0.5M and 1M are two."""
    from steplab.law.hparams import cell_ids
    from steplab.law.tables import RunsTable

    D = np.array([499_712, 500_224, 499_712, 999_936, 1_001_472, 999_936, 500_224, 1_001_472], float)
    N = np.array([1e5, 1e5, 1e5, 1e5, 1e5, 1e5, 4e5, 4e5])
    ids = cell_ids(RunsTable({"N": N, "D": D}))
    assert len(set(ids)) == 4
    assert len({ids[0], ids[1], ids[2]}) == 1 and len({ids[3], ids[4], ids[5]}) == 1 and ids[6] != ids[0]
    loss = np.array([3.50, 3.40, 3.60, 3.0, 3.2, 3.1, 3.3, 2.9])
    keep = select_near_best(RunsTable({"N": N, "D": D, "loss": loss}))
    assert keep.tolist() == [False, True, False, True, False, False, True, True]
