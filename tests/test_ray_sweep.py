"""`law sweep --launcher ray`: 4 runs as Ray tasks on a local Ray instance give the same runs table as the pool."""
from __future__ import annotations

import csv

import pytest

from steplab.law.sweep import run_sweep
from test_law_plan_sweep import grid_dict

ray = pytest.importorskip("ray")
TIMING = ("train_seconds", "tok_per_s")  # wall-clock columns differ between any two runs


def table(sweep_dir):
    with open(sweep_dir / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def test_ray_sweep_matches_local_pool(tiny_data, tmp_path):
    local = run_sweep(grid_dict(), tmp_path / "local", data_path=tiny_data, workers=1, threads=1, progress=False,
                      return_result=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        remote = run_sweep(grid_dict(), tmp_path / "ray", data_path=tiny_data, threads=1, progress=False, return_result=True,
                           launcher="ray")
    finally:
        ray.shutdown()
    assert len(local.finished) == len(remote.finished) == 4 and not remote.failed
    assert table(tmp_path / "ray") == table(tmp_path / "local")
    # and it resumes like the pool: nothing left to run
    again = run_sweep(grid_dict(), tmp_path / "ray", data_path=tiny_data, threads=1, progress=False, return_result=True,
                      launcher="ray")
    assert len(again.skipped) == 4 and not again.finished
