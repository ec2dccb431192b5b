"""Farseer and Kaplan next to Chinchilla, and plans within the data (Muennighoff et al.'s repeated-epoch law)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from steplab.cli import main
from steplab.errors import ConfigError, FitError
from steplab.law.data_limits import R_STAR, data_plan, effective_tokens, line_optimum
from steplab.law.farseer import _predict, fit_farseer
from steplab.law.fit import fit_parametric
from steplab.law.kaplan import fit_kaplan
from steplab.law.plan import coefficients_fit, plan

TRUE = np.array([0.3, np.log(0.3), -0.2, 0.1, np.log(1.5), -0.3, -0.1, np.log(2.5), -0.4])


def farseer_grid(noise: float = 0.0, seed: int = 0):
    N = np.repeat([1e5, 2e5, 4e5, 8e5, 1.6e6], 4)
    D = np.tile([1e6, 2e6, 4e6, 8e6], 5)
    L = _predict(TRUE, N / 4e5, D / 2.83e6)
    return N, D, L * np.exp(np.random.default_rng(seed).normal(0, noise, len(L)))


def test_farseer_recovers_its_own_law_and_extrapolates():
    N, D, L = farseer_grid()
    fit = fit_farseer(N, D, L, n_bootstrap=5, holdout=3, n_starts=4)
    assert fit.rmse_log < 1e-3 and fit.n == 17
    assert max(abs(h["rel_err"]) for h in fit.holdout) < 0.005  # the 3 largest-compute runs, unseen
    far = fit.predict(3.2e6, 1.6e7) / _predict(TRUE, 3.2e6 / 4e5, 1.6e7 / 2.83e6) - 1
    assert abs(far) < 0.01
    lo, hi = fit.predict_interval([4e5], [4e6])
    assert lo[0] <= fit.predict(4e5, 4e6) <= hi[0]
    beta = fit.beta_of([1e5, 1.6e6])
    assert beta[0] != pytest.approx(beta[1], rel=1e-3)  # the data exponent depends on N


def test_farseer_needs_data_and_cli_form(tmp_path, capsys):
    N, D, L = farseer_grid(noise=0.002)
    with pytest.raises(FitError, match="9 parameters need"):
        fit_farseer(N[:8], D[:8], L[:8], n_bootstrap=0)
    table = tmp_path / "runs.csv"
    table.write_text("N,D,loss\n" + "".join(f"{n},{d},{x}\n" for n, d, x in zip(N, D, L)))
    assert main(["law", "fit", str(table), "--form", "farseer", "--bootstrap", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "farseer" and out["quality"]["n"] == 20 and out["quality"]["rmse_log_loss"] < 0.01
    from steplab.law.report import summary_lines

    lines = summary_lines(fit_farseer(N, D, L, n_bootstrap=3, n_starts=2))
    assert lines[0].startswith("Farseer form") and any("data exponent beta(N)" in x for x in lines)


KAPLAN = (np.log(8e13), np.log(5e13), 0.076, 0.095)  # Kaplan et al. 2020's fitted Nc, Dc, alpha_N, alpha_D


def kaplan_loss(N, D):
    lnc, ldc, aN, aD = KAPLAN
    return ((np.exp(lnc) / N) ** (aN / aD) + np.exp(ldc) / D) ** aD


def test_kaplan_recovers_its_law_where_chinchilla_cannot():
    N = np.repeat([1e5, 2e5, 4e5, 8e5, 1.6e6], 4)
    D = np.tile([1e6, 2e6, 4e6, 8e6], 5)
    L = kaplan_loss(N, D) * np.exp(np.random.default_rng(0).normal(0, 0.002, len(N)))
    fit = fit_kaplan(N, D, L, n_bootstrap=20, holdout=3)
    assert fit.n == 17 and fit.rmse_log < 0.003
    assert fit.alpha == pytest.approx(KAPLAN[2], rel=0.15) and fit.beta == pytest.approx(KAPLAN[3], rel=0.15)
    assert max(abs(h["rel_err"]) for h in fit.holdout) < 0.01  # the 3 largest-compute runs, unseen
    lo, hi = fit.predict_interval([3.2e6], [1.6e7])
    assert lo[0] < kaplan_loss(3.2e6, 1.6e7) < hi[0]
    rlo, rhi = fit.predict_run_interval([3.2e6], [1.6e7])
    assert rlo[0] < lo[0] and rhi[0] > hi[0]  # one run's interval adds its scatter to the law's
    # the additive form cannot follow the N x D interaction: a worse fit on the same points
    chin = fit_parametric(N, D, L, n_bootstrap=0, holdout=3)
    assert chin.rmse_log > 1.5 * fit.rmse_log


def test_kaplan_errors_and_cli_form(tmp_path, capsys):
    N = np.repeat([1e5, 4e5, 1.6e6], 3)
    D = np.tile([1e6, 4e6, 1.6e7], 3)
    L = kaplan_loss(N, D)
    with pytest.raises(FitError, match="4 parameters need at least 6 runs"):
        fit_kaplan(N[:5], D[:5], L[:5], n_bootstrap=0)
    with pytest.raises(FitError, match="needs at least 6 of the 9 runs left to fit"):
        fit_kaplan(N, D, L, n_bootstrap=0, holdout=4)
    table = tmp_path / "runs.csv"
    table.write_text("N,D,loss\n" + "".join(f"{n},{d},{x}\n" for n, d, x in zip(N, D, L)))
    assert main(["law", "fit", str(table), "--form", "kaplan", "--bootstrap", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "kaplan" and out["quality"]["rmse_log_loss"] < 1e-4
    assert out["alpha_N"] == pytest.approx(KAPLAN[2], rel=1e-3)
    assert main(["law", "fit", str(table), "--form", "kaplan", "--bootstrap", "0"]) == 0
    assert "Kaplan form" in capsys.readouterr().out


LAW = coefficients_fit(E=1.8, A=400.0, B=2000.0, alpha=0.34, beta=0.28)


def test_effective_tokens_follow_muennighoff():
    U = 1e9
    assert effective_tokens(5e8, U) == 5e8 and effective_tokens(U, U) == U
    four = float(effective_tokens(4 * U, U))
    assert four == pytest.approx(U * (1 + R_STAR * (1 - np.exp(-3 / R_STAR))))
    assert 3.6 * U < four < 4 * U  # four epochs are worth a little less than four fresh passes


def test_line_optimum_matches_the_closed_form():
    N, D = line_optimum(LAW.predict, 1e21)
    N_cf, D_cf = LAW.allocation(1e21)
    assert N == pytest.approx(float(N_cf), rel=1e-3) and D == pytest.approx(float(D_cf), rel=1e-3)


def test_data_plan_cases():
    C = 1e21
    _, D_opt = LAW.allocation(C)
    fits = data_plan(LAW, C, unique=10 * float(D_opt))
    assert fits.kind == "fits" and fits.D == pytest.approx(float(D_opt), rel=1e-3)
    U = float(D_opt) / 2
    one = data_plan(LAW, C, U, mode="one-epoch")
    assert one.kind == "one-epoch" and one.D == U and one.N == pytest.approx(C / (6 * U))
    for D in (U / 2, U / 1.2):  # any other point within the data is worse
        assert LAW.predict(C / (6 * D), D) > LAW.predict(one.N, one.D)
    rep = data_plan(LAW, C, U, mode="auto")  # ~2x D_opt beyond the data: a few epochs, so repeat
    assert rep.kind == "repeat" and 1 < rep.epochs <= 4 and "Muennighoff" in rep.why
    assert LAW.predict(rep.N, rep.D_effective) < LAW.predict(one.N, one.D)  # repeating beats one epoch here
    far = data_plan(LAW, C, float(D_opt) / 50, mode="auto")  # would need many epochs: one epoch instead
    assert far.kind == "one-epoch" and "epochs" in far.why
    with pytest.raises(ConfigError, match="data mode"):
        data_plan(LAW, C, U, mode="twice")


def test_plan_with_unique_tokens_says_which(capsys):
    C = 1e21
    _, D_opt = LAW.allocation(C)
    p = plan(compute=C, fit=LAW, unique_tokens=float(D_opt) / 2, data_mode="one-epoch")
    assert p.data["kind"] == "one-epoch" and p.D == pytest.approx(float(D_opt) / 2)
    assert any(n.startswith("data: ") for n in p.notes)
    r = plan(compute=C, fit=LAW, unique_tokens=float(D_opt) / 2)
    assert r.data["kind"] == "repeat" and r.loss == pytest.approx(float(LAW.predict(r.N, r.data["D_effective"])))
    with pytest.raises(ConfigError, match="compute alone"):
        plan(params=1e9, fit=LAW, unique_tokens=1e9)
    assert main(["law", "plan", "--compute", "1e21", "--unique-tokens", "1e9", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["data"]["kind"] in ("repeat", "one-epoch") and out["D"] > 0
