"""law plan (compute-optimal allocation, shapes, configs, CLI) and law sweep (pool, table, resume)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from steplab.cli import main
from steplab.config import resolve
from steplab.errors import ConfigError
from steplab.law.fit import fit_parametric
from steplab.law.hparams import suggest
from steplab.law.plan import coefficients_fit, find_shape, plan, write_config
from steplab.law.grid import expand_grid
from steplab.law.sweep import run_sweep
from steplab.law.tables import load_table
from steplab.models import count_params

LAW = dict(E=1.7, A=400.0, B=1500.0, alpha=0.34, beta=0.30)


# ------------------------------------------------------------------------------------------------ plan

@pytest.mark.parametrize("C", [1e13, 1e18, 1e21, 3e23])
def test_plan_minimises_fitted_loss_on_the_compute_line(C):
    law = coefficients_fit(**LAW)
    p = plan(compute=C, fit=law, seq_len=256)
    assert 6 * p.N * p.D == pytest.approx(C, rel=1e-9)
    N = np.logspace(np.log10(p.N) - 3, np.log10(p.N) + 3, 200_001)
    scan = law.predict(N, C / (6 * N))
    assert p.loss <= scan.min() + 1e-12
    assert N[np.argmin(scan)] == pytest.approx(p.N, rel=1e-3)
    # given N (or D) alone: the compute for which it is optimal, i.e. the same point
    q = plan(params=p.N, fit=law, seq_len=256)
    r = plan(tokens=p.D, fit=law, seq_len=256)
    assert q.compute == pytest.approx(C, rel=1e-9) and q.D == pytest.approx(p.D, rel=1e-9)
    assert r.compute == pytest.approx(C, rel=1e-9) and r.N == pytest.approx(p.N, rel=1e-9)


def test_plan_two_given_and_bad_input():
    p = plan(params=1e6, tokens=2e7, seq_len=256)
    assert p.compute == pytest.approx(1.2e14) and "nothing optimised" in p.given
    with pytest.raises(ConfigError, match="give one of"):
        plan(seq_len=256)
    with pytest.raises(ConfigError, match="at most two"):
        plan(1e15, 1e6, 1e8)
    with pytest.raises(ConfigError, match="positive"):
        plan(compute=-1.0)


@pytest.mark.parametrize("target", [3e4, 1e5, 4.4e5, 2e6, 3.7e7, 1e9, 7e10])
def test_shape_hits_target_N(target):
    shape = find_shape(target, seq_len=256)
    m = shape["model"]
    assert abs(shape["N"] / target - 1) < 0.02
    assert 32 <= m["d_model"] / m["n_layer"] <= 128 and 32 <= m["d_model"] // m["n_head"] <= 128
    assert m["d_model"] % m["n_head"] == 0


def test_shape_in_a_fixed_family():
    for target in (3.3e4, 2.4e5, 9e5):
        shape = find_shape(target, seq_len=256, n_layer=2, n_head=2)
        assert shape["model"]["n_layer"] == 2 and shape["model"]["n_head"] == 2 and abs(shape["rel_err"]) < 0.02
    with pytest.raises(ConfigError, match="no model shape"):
        find_shape(1e3, seq_len=256, n_layer=8)


def test_plan_config_is_a_train_config_hitting_N(tmp_path):
    p = plan(compute=2e13, fit=coefficients_fit(**LAW), seq_len=256)
    for name in ("plan.toml", "plan.json"):
        path = write_config(p, tmp_path / name)
        cfg = resolve(None, str(path), [f"data.path={tmp_path}"])
        N = count_params(cfg.model)["N"]
        assert abs(N / p.N - 1) < 0.02
        assert cfg.train.lr == pytest.approx(suggest(N, p.D, 256)["lr"], rel=1e-6)
        assert abs(cfg.train.max_steps * cfg.tokens_per_step / p.D - 1) < 0.05
        assert cfg.data.seq_len == 256 and cfg.model.max_seq_len >= 256


def test_plan_moe_active_vs_total():
    p = plan(compute=1e20, moe=True)
    assert abs(p.N_active_model / p.N - 1) < 0.02 and p.N_model > 2 * p.N_active_model
    assert p.lr == pytest.approx(suggest(p.N_model, p.D, 2048)["lr"])  # lr from TOTAL N
    text = "\n".join(p.lines())
    assert "TOTAL" in text and "N_active" in text and "total N predicts" in text
    cfg = resolve(None, None, [])
    from steplab.config import RunConfig
    cfg = RunConfig.from_dict(p.config).validate()
    counts = count_params(cfg.model)
    assert counts["N"] == p.N_model and counts["N_active"] == p.N_active_model


def test_plan_interval_from_bootstrap_fit():
    rng = np.random.default_rng(0)
    N = np.repeat(np.logspace(5, 6.5, 5), 4)
    D = np.tile(np.logspace(6, 7.5, 4), 5)
    L = (LAW["E"] + LAW["A"] / N ** LAW["alpha"] + LAW["B"] / D ** LAW["beta"]) * np.exp(rng.normal(0, 0.003, len(N)))
    fit = fit_parametric(N, D, L, n_bootstrap=50, seed=0)
    p = plan(compute=4 * 6 * N.max() * D.max(), fit=fit, seq_len=256)
    lo, hi = p.loss_ci
    assert lo <= p.loss <= hi and hi - lo < 0.1 * p.loss


def test_plan_cli_json(tmp_path, capsys):
    out = tmp_path / "big.toml"
    assert main(["law", "plan", "--compute", "1e15", "--seq-len", "256", "--json", "--out", str(out)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["compute"] == pytest.approx(1e15) and 6 * d["N"] * d["D"] == pytest.approx(1e15)
    assert d["lr"] > 0 and d["batch_sequences"] >= 1 and d["config"]["train"]["max_steps"] >= 1
    assert out.is_file() and resolve(None, str(out), []).model.d_model == d["model"]["d_model"]
    # --from a runs table: the law is fitted first, so the loss has an interval
    rng = np.random.default_rng(1)
    rows = ["N,D,loss"] + [f"{n},{t},{(LAW['E'] + LAW['A'] / n ** 0.34 + LAW['B'] / t ** 0.3) * np.exp(rng.normal(0, 0.002))}"
                           for n in np.logspace(5, 6.5, 4) for t in np.logspace(6, 7.5, 4)]
    (tmp_path / "runs.csv").write_text("\n".join(rows) + "\n")
    assert main(["law", "plan", "--params", "2e6", "--seq-len", "256", "--from", str(tmp_path / "runs.csv"),
                 "--bootstrap", "30", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["loss_ci"] is not None and d["N"] == pytest.approx(2e6) and "fitted law" in d["law"]


# ----------------------------------------------------------------------------------------------- sweep

def grid_dict() -> dict:
    """2 sizes x 2 token budgets of ~0.02-0.1M-parameter models: well under a second per run."""
    return {
        "sizes": [{"d_model": 32, "n_layer": 1, "n_head": 2}, {"d_model": 64, "n_layer": 2, "n_head": 4, "n_kv_head": 2}],
        "tokens": [1536, 2560],
        "lr": [3e-3],
        "batch_tokens": [256],
        "eval_tokens": 512, "mode": "independent",
        "fixed": {"data": {"seq_len": 64}, "model": {"max_seq_len": 128}, "train": {"warmup_steps": 2}},
    }


@pytest.fixture(scope="module")
def swept(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    res = run_sweep(grid_dict(), out, data_path=tiny_data, workers=1, threads=1, progress=False, return_result=True)
    return out, res


def test_sweep_writes_a_runs_table(swept):
    out, res = swept
    assert len(res.finished) == 4 and not res.failed and res.table == out / "runs.csv"
    table = load_table(out / "runs.csv", adapter="runs")
    assert len(table) == 4 and len(np.unique(table["N"])) == 2 and sorted(set(table["D"])) == [1536.0, 2560.0]
    assert np.all(np.isfinite(table["loss"])) and np.all(table["loss"] < 7.0)
    assert np.all(table["C"] == 6 * table["N"] * table["D"]) and np.all(table["batch_tokens"] == 256)
    assert np.all(table["lr"] == 3e-3)
    assert len(load_table(out / "runs.jsonl", adapter="runs")) == 4
    for run in out.glob("runs/*"):
        assert (run / "summary.json").is_file() and (run / "metrics.jsonl").is_file()


def test_sweep_resumes_only_the_unfinished_run(swept, tiny_data):
    out, _ = swept
    before = (out / "runs.csv").read_bytes()
    runs = sorted(out.glob("runs/*"))
    mtimes = {r.name: (r / "summary.json").stat().st_mtime_ns for r in runs}
    victim = runs[1]
    (victim / "summary.json").unlink()  # as if the process died after its last checkpoint
    time.sleep(0.01)
    res = run_sweep(grid_dict(), out, data_path=tiny_data, workers=0, threads=1, progress=False, return_result=True)
    assert res.finished == [victim.name] and len(res.skipped) == 3
    for r in runs:
        same = (r / "summary.json").stat().st_mtime_ns == mtimes[r.name]
        assert same == (r != victim)
    assert (out / "runs.csv").read_bytes() == before  # the resumed run reproduces its row exactly


def test_sweep_run_ids_are_deterministic(tiny_data):
    a = [r.run_id for r in expand_grid(grid_dict(), str(tiny_data))]
    assert a == [r.run_id for r in expand_grid(grid_dict(), str(tiny_data))] and len(set(a)) == 4
    changed = grid_dict()
    changed["fixed"]["train"]["warmup_steps"] = 3
    assert set(a).isdisjoint(r.run_id for r in expand_grid(changed, str(tiny_data)))
    law = grid_dict()
    law["lr"], law["batch_tokens"] = ["steplaw", "steplaw*0.5"], ["steplaw"]
    runs = expand_grid(law, str(tiny_data))
    assert len(runs) == 8
    flat = {**law, "hparams": {"lr_coef_N": 0.0, "lr_intercept": -5.0}}  # "steplaw" with our own coefficients
    import math
    assert expand_grid(flat, str(tiny_data))[0].config["train"]["lr"] == pytest.approx(math.exp(-5.0) * 1536 ** 0.307)
    N, D = count_params(resolve(None, None, ["model.d_model=32", "model.n_layer=1", "model.n_head=2"]).model)["N"], 1536
    assert runs[0].config["train"]["lr"] == pytest.approx(suggest(N, D)["lr"])
    assert runs[1].config["train"]["lr"] == pytest.approx(0.5 * suggest(N, D)["lr"])


@pytest.mark.parametrize("patch,message", [
    ({"sizez": []}, "unknown key"),
    ({"tokens": []}, "'tokens' must be a non-empty list"),
    ({"lr": ["fast"]}, "give a number, 'steplaw'"),
    ({"tokens": [10]}, "at least one sequence"),
    ({"sizes": [{"d_model": 30, "n_head": 4}]}, "does not divide"),
    ({"hparams": {"lr_slope": 1.0}}, "unknown \\[hparams\\] key"),
    ({"warmup_tokens": -5}, "warmup_tokens = -5 must be a positive number of tokens"),
])
def test_sweep_grid_errors(tiny_data, patch, message):
    with pytest.raises(ConfigError, match=message):
        expand_grid({**grid_dict(), **patch}, str(tiny_data))


def test_sweep_cli_dry_run(tiny_data, tmp_path, capsys):
    grid = tmp_path / "grid.toml"
    grid.write_text('sizes = [{d_model = 32, n_layer = 1, n_head = 2}, "step1-nano"]\ntokens = [2048, 4096]\n'
                    'lr = ["steplaw"]\n[fixed]\ndata = {seq_len = 64}\n')
    assert main(["law", "sweep", "--grid", str(grid), "--data", str(tiny_data), "--out", str(tmp_path / "s"),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out  # a D grid defaults to wsd: per size one stable run and a branch per budget
    assert out.count("new ") == 6 and "6 runs" in out and out.count("(stable phase)") == 2
    assert "step1-nano-wsd-D2.048k" in out and out.count("(branch of step") == 4


# -------------------------------------------------------------------------------------- MoE in the lab

MOE = {"n_experts": 4, "top_k": 2, "n_shared": 1, "d_expert": 32}


@pytest.fixture(scope="module")
def moe_swept(tiny_data, tmp_path_factory):
    """3 MoE sizes x 3 budgets: the sweep, table, fit and plan path of Step-2 runs."""
    out = tmp_path_factory.mktemp("moe_sweep")
    grid = {**grid_dict(), "sizes": [{"d_model": d, "n_layer": 1, "n_head": 2, "moe": MOE, "name": f"moe-d{d}"}
                                     for d in (32, 48, 64)], "tokens": [1536, 2560, 4096]}
    run_sweep(grid, out, data_path=tiny_data, workers=0, threads=1, progress=False)
    return out


def test_moe_sweep_table_counts_active_params(moe_swept):
    table = load_table(moe_swept / "runs.csv", adapter="runs")
    assert len(table) == 9 and np.all(table["n_experts"] == 4) and np.all(table["top_k"] == 2)
    assert np.all(table["N_active"] < 0.75 * table["N"])  # 3 of 5 experts per token, attention shared
    assert np.all(table["C"] == 6 * table["N_active"] * table["D"])  # compute is what a token pays for


def test_moe_fit_uses_active_params_and_plans_moe_only(moe_swept, swept):
    from steplab.errors import FitError
    from steplab.law.fit import FitWarning, fit_table

    table = load_table(moe_swept / "runs.csv", adapter="runs")
    with pytest.warns(FitWarning):  # 9 tiny runs do not pin down E; the mechanics are what is tested here
        fit = fit_table(table, "chinchilla", n_bootstrap=0)
        ref = fit_parametric(table["N_active"], table["D"], table["loss"], n_bootstrap=0)
    assert fit.N_is == "N_active" and fit.n == 9 and any("ACTIVE" in n for n in fit.notes)
    assert (fit.E, fit.alpha, fit.beta) == pytest.approx((ref.E, ref.alpha, ref.beta))
    p = plan(params=2e5, fit=fit, moe=True, seq_len=64)
    assert p.N_active_model == pytest.approx(2e5, rel=0.05) and p.N_model > 1.5 * p.N_active_model
    assert p.loss == pytest.approx(float(fit.predict(2e5, p.D)))
    assert any("fitted on MoE runs" in n for n in p.notes)
    with pytest.raises(ConfigError, match="plan an MoE with --moe"):
        plan(compute=1e12, fit=fit, seq_len=64)
    # one law per layout: dense and MoE runs in one table are refused
    lines = {}
    for path in (swept[0] / "runs.csv", moe_swept / "runs.csv"):
        head, *rows = path.read_text().splitlines()
        lines.setdefault("head", head.split(","))
        lines.setdefault("rows", []).extend(dict(zip(head.split(","), r.split(","))) for r in rows)
    cols = sorted({k for r in lines["rows"] for k in r})
    mixed = moe_swept / "mixed.csv"
    mixed.write_text("\n".join([",".join(cols)] + [",".join(r.get(c, "") for c in cols) for r in lines["rows"]]) + "\n")
    with pytest.raises(FitError, match="mixes dense and MoE runs"):
        fit_table(load_table(mixed, adapter="runs"), "chinchilla", n_bootstrap=0)
