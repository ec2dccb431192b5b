"""The quickstart's law points and its planned run share one recipe (no training here: configs only), and the
planned run's interval is one run's (the law's bootstrap and a run's own scatter), not the law's mean."""
from __future__ import annotations

import json

import numpy as np
import pytest

from steplab import quickstart as q
from steplab.law.grid import expand_grid


def _data(tmp_path, tokens: int = 2_000_000):
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"source": "test", "vocab_size": 1024, "seed": 0,
                                                "train": {"tokens": tokens}, "val": {"tokens": 100_000}}))
    return data


def test_sweep_runs_and_planned_run_share_one_warmup(tmp_path):
    data = _data(tmp_path)
    grid = q.sweep_grid(1.0, "cpu", seed=0, unique_tokens=2_000_000)
    runs = expand_grid(grid, str(data))
    big, *_ = q.plan_big_run(None, None, 1.1e13, grid, data, tmp_path, unique_tokens=2_000_000)
    warmups = {r.config["train"]["warmup_steps"] for r in runs} | {big["config"]["train"]["warmup_steps"]}
    # one warm-up: 5% of the largest budget's steps, which is also 5% of the planned run's own steps at one pass
    assert len(warmups) == 1, warmups
    steps = big["config"]["train"]["max_steps"]
    assert warmups.pop() == round(0.05 * steps)
    assert all(r.config["train"]["warmup_steps"] < r.config["train"]["max_steps"] * 0.8 for r in runs)


def test_run_interval_adds_a_runs_scatter_and_covers_new_runs():
    from steplab.law.fit import fit_parametric

    rng = np.random.default_rng(0)
    N = np.repeat([1.4e4, 3.3e4, 5.5e4, 1.1e5, 2.2e5], 3).astype(float)
    D = np.tile([5e5, 1e6, 2e6], 5).astype(float)
    law = lambda n, d: 1.8 + 60 / n ** 0.45 + 400 / d ** 0.35  # noqa: E731
    sigma = 0.02
    L = law(N, D) * np.exp(sigma * rng.standard_normal(len(N)))
    fit = fit_parametric(N, D, L, n_bootstrap=100, seed=0)
    lo_law, hi_law = fit.predict_interval(np.array([8.8e5]), np.array([2e6]))
    lo, hi = fit.predict_run_interval(np.array([8.8e5]), np.array([2e6]))
    assert lo[0] < lo_law[0] and hi[0] > hi_law[0]
    assert fit.run_sigma() == pytest.approx(fit.rmse_log * np.sqrt(15 / 10))
    # at least the scatter alone: +-1.96 sigma in log loss around the prediction
    p = float(fit.predict(8.8e5, 2e6))
    assert np.log(hi[0] / lo[0]) >= 2 * 1.9 * fit.run_sigma()
    # new runs at a sweep point land inside their run interval about 95% of the time
    n_in = 0
    for n, d in zip(N, D):
        a, b = fit.predict_run_interval(np.array([n]), np.array([d]))
        draws = law(n, d) * np.exp(sigma * rng.standard_normal(200))
        n_in += int(((draws >= a[0]) & (draws <= b[0])).sum())
    assert 0.85 < n_in / (200 * len(N)) <= 1.0 and lo[0] < p < hi[0]


def test_running_fit_is_a_quick_one(monkeypatch, capsys):
    """The running fit after each sweep point runs in the main process while the workers use every core: a few
    starts and 50 bootstrap draws, not the final fit's 64 starts and 300 draws."""
    import steplab.law.fit as fit_mod

    seen = []
    real = fit_mod.fit_parametric
    monkeypatch.setattr(fit_mod, "fit_parametric", lambda *a, **k: seen.append(k) or real(*a, **k))
    rows = [{"N": n, "D": d, "loss": 1.8 + 60 / n ** 0.45 + 400 / d ** 0.35}
            for n in (1.4e4, 3.3e4, 5.5e4, 1.1e5, 2.2e5) for d in (5e5, 1e6, 2e6)]
    q._running_fit(rows, 1024, 1.1e13, 2e6, moe=False)
    assert seen and seen[0]["n_starts"] <= 8 and seen[0]["n_bootstrap"] <= 50
    assert "fit on 15 points" in capsys.readouterr().out
