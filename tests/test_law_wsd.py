"""WSD sweeps: one stable run per size, a decay branch per budget; scheduling over the usable cores."""
from __future__ import annotations

import json

import numpy as np
import pytest

from steplab.config import RunConfig
from steplab.law.grid import expand_grid
from steplab.law.sweep import _priority, auto_workers, run_sweep, usable_cores
from steplab.law.tables import load_table
from steplab.train.trainer import train


def wsd_grid(**extra) -> dict:
    """2 sizes x 3 budgets of tiny models, as wsd branches (the default for a D grid)."""
    return {"sizes": [{"d_model": 32, "n_layer": 1, "n_head": 2}, {"d_model": 64, "n_layer": 2, "n_head": 4, "n_kv_head": 2}],
            "tokens": [1536, 2560, 5120], "lr": [3e-3], "batch_tokens": [256], "eval_tokens": 512,
            "fixed": {"data": {"seq_len": 64}, "model": {"max_seq_len": 128}, "train": {"warmup_steps": 2}}, **extra}


@pytest.fixture(scope="module")
def wsd_swept(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("wsd")
    res = run_sweep(wsd_grid(), out, data_path=tiny_data, workers=0, threads=1, progress=False, return_result=True)
    return out, res


def test_wsd_is_the_default_for_a_D_grid(tiny_data):
    runs = expand_grid(wsd_grid(), str(tiny_data))
    stable = [r for r in runs if r.stable]
    branches = [r for r in runs if r.parent]
    assert len(stable) == 2 and len(branches) == 6
    for r in branches:
        t = r.config["train"]
        assert t["schedule"] == "wsd" and t["init_state"] and r.parent in {s.run_id for s in stable}
        assert int(t["max_steps"] * (1 - t["decay_fraction"])) == r.branch_step  # decay starts at the branch point
    assert [r.branch_step for r in branches[:3]] == [4, 8, 16]  # 80% of 6, 10, 20 steps
    assert stable[0].config["train"]["schedule"] == "constant" and stable[0].config["train"]["ckpt_at"] == "4,8,16"
    assert len(expand_grid(wsd_grid(mode="independent"), str(tiny_data))) == 6


def test_wsd_sweep_table_and_cost(wsd_swept):
    out, res = wsd_swept
    assert len(res.finished) == 8 and not res.failed
    table = load_table(out / "runs.csv", adapter="runs")
    assert len(table) == 6 and sorted(set(table["D"])) == [1536.0, 2560.0, 5120.0]
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["mode"] == "wsd"
    # independent: 6 + 10 + 20 = 36 steps per size; wsd: 16 stable + 2 + 2 + 4 decay = 24 -> 1.5x fewer FLOPs
    assert sweep["cost"]["flops_if_independent"] / sweep["cost"]["flops"] == pytest.approx(1.5)
    for line in (out / "runs.jsonl").read_text().splitlines():
        row = json.loads(line)
        s = json.loads((out / "runs" / row["run"] / "summary.json").read_text())
        assert s["init_from"].endswith(f"step_{row['branch_step']:08d}") and row["parent"] in s["init_from"]
        assert s["init_step"] == row["branch_step"] and s["threads"] == 1
        assert s["D"] == row["D"] and s["trained_tokens"] == s["D"] - row["branch_step"] * 256


def test_branch_equals_the_same_wsd_run_trained_from_scratch(wsd_swept, tmp_path):
    """Every branch (2 sizes x 3 budgets) is exactly the independent WSD run it stands for when that run has the
    branch's recipe (lr, batch, warm-up, decay over the same last steps; CPU, same threads): same loss to the bit.
    So data order, evaluation and the branching itself add nothing; what separates a branch from an independent
    run of another recipe is only that recipe (bench/wsd_branches.py measures it)."""
    import torch

    out, _ = wsd_swept
    torch.set_num_threads(1)
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for i, row in enumerate(rows):
        cfg = json.loads((out / "runs" / row["run"] / "config.json").read_text())
        cfg["train"].update(init_from="", init_state=False, decay_fraction=0.2)  # the plain recipe's decay
        s = train(RunConfig.from_dict(cfg), tmp_path / f"scratch{i}", progress=False)
        assert s["val_loss"] == row["loss"] and s["init_step"] == 0, row["run"]


def test_rule_tokens_makes_independent_runs_share_the_branch_recipe(tiny_data):
    """rule_tokens evaluates the Step Law rules at one D for every run: independent runs then get the lr and batch
    the wsd branches of the same grid have."""
    g = wsd_grid(lr=["steplaw"], batch_tokens=["steplaw"], hparams={"lr_intercept": -5.0})
    branches = [r for r in expand_grid(g, str(tiny_data)) if r.parent]
    ind = expand_grid({**g, "mode": "independent", "rule_tokens": 5120}, str(tiny_data))
    own = expand_grid({**g, "mode": "independent"}, str(tiny_data))
    for b, i in zip(branches, ind):
        assert (b.config["train"]["lr"], b.config["train"]["batch_size"]) == (i.config["train"]["lr"], i.config["train"]["batch_size"])
    assert own[0].config["train"]["lr"] < ind[0].config["train"]["lr"]  # lr grows with D in the rule
    with pytest.raises(Exception, match="rule_tokens"):
        expand_grid({**g, "rule_tokens": -1}, str(tiny_data))


def test_wsd_resume_rebuilds_the_same_table(wsd_swept, tiny_data):
    out, _ = wsd_swept
    before = (out / "runs.csv").read_bytes()
    victim = json.loads((out / "runs.jsonl").read_text().splitlines()[2])["run"]
    (out / "runs" / victim / "summary.json").unlink()
    res = run_sweep(wsd_grid(), out, data_path=tiny_data, workers=0, threads=1, progress=False, return_result=True)
    assert res.finished == [victim] and len(res.skipped) == 7
    assert (out / "runs.csv").read_bytes() == before


@pytest.mark.slow  # ~35 s on a busy 2-core machine: two spawned workers import torch
def test_pool_of_two_gives_the_same_table(wsd_swept, tiny_data, tmp_path):
    """Two workers (branches start as their stable run ends) reproduce the in-process table exactly."""
    out, _ = wsd_swept
    seen = []
    run_sweep(wsd_grid(), tmp_path / "p2", data_path=tiny_data, workers=2, threads=1, progress=False,
              on_result=lambda rows: seen.append(len(rows)))
    a = load_table(out / "runs.csv", adapter="runs")
    b = load_table(tmp_path / "p2" / "runs.csv", adapter="runs")
    assert list(a["label"]) == list(b["label"]) and np.array_equal(a["loss"], b["loss"])
    assert seen == [1, 2, 3, 4, 5, 6]  # the running-fit hook sees the table grow run by run


def test_longest_first_and_workers(tiny_data):
    runs = expand_grid(wsd_grid(), str(tiny_data))
    prio = _priority(runs)
    big_stable = max((r for r in runs if r.stable), key=lambda r: r.cost)
    assert max(prio, key=prio.get) == big_stable.run_id  # the critical path starts first
    assert auto_workers(100) == usable_cores() and auto_workers(1) == 1


def test_branch_of_a_failed_stable_run_fails_with_it(tiny_data, tmp_path):
    grid = wsd_grid(sizes=[{"d_model": 32, "n_layer": 1, "n_head": 2}], lr=[1e4])  # diverges
    res = run_sweep(grid, tmp_path / "s", data_path=tiny_data, workers=0, threads=1, progress=False, return_result=True)
    assert len(res.failed) == 4 and sum("stable-phase run" in e for e in res.failed.values()) == 3
