"""The one trainer trains any registered family on any registered data kind (train/data.py, models/__init__.py).

A family with no token vocabulary (a small regression network on a seeded stream) must train, evaluate
through its own ``eval_metrics``, resume exactly and report in the same run directory shape as text.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from steplab.config import RunConfig
from steplab.errors import ConfigError
from steplab.models import Family, count_params, register_family
from steplab.train.data import register_data
from steplab.train.trainer import train


class Regression(torch.nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, cfg.d_model), torch.nn.GELU(), torch.nn.Linear(cfg.d_model, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)

    def eval_metrics(self, batches) -> dict[str, float]:
        losses = [float(self(x, y)) for x, y in batches]
        return {"val_loss": sum(losses) / len(losses), "val_rmse": float(np.sqrt(np.mean(losses)))}


def _count(cfg) -> dict[str, int]:
    n = 8 * cfg.d_model + cfg.d_model + cfg.d_model + 1
    return {"N": n, "N_active": n, "embedding": 0, "total": n}


class RegressionData:
    """y = x . w: an endless seeded stream whose state is the number of batches served."""

    tokenizer_dir = None
    vocab_size = 0

    def __init__(self, cfg: RunConfig) -> None:
        self.batch_size, self.seed, self.served = cfg.train.batch_size, cfg.train.seed, 0
        self.tokens_per_batch = self.batch_size
        self.w = torch.linspace(-1, 1, 8)

    def _batch(self, index: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + split * 7_919 + index)
        x = torch.randn(self.batch_size, 8, generator=g)
        return x, x @ self.w

    def next_batch(self):
        self.served += 1
        return self._batch(self.served - 1, 0)

    def state_dict(self) -> dict:
        return {"served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.served = state["served"]

    def eval_batches(self):
        return (self._batch(i, 1) for i in range(4))


register_family("test-regression", lambda: Family("test-regression", Regression, _count,
                                                  lambda cfg, seq_len: {"6N": 6.0 * _count(cfg)["N"], "model": 6.0 * _count(cfg)["N"]}))
register_data("test-regression", RegressionData)


def _cfg(**train) -> RunConfig:
    cfg = RunConfig()
    cfg.model.family, cfg.model.d_model = "test-regression", 32
    cfg.data.kind = "test-regression"
    cfg.train.__dict__.update(dict(batch_size=16, max_steps=30, lr=1e-2, warmup_steps=2, eval_every=10, ckpt_every=10,
                                   keep_last=0, dtype="fp32", device="cpu", log_every=1), **train)
    return cfg


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_non_text_family_trains_evaluates_and_reports(tmp_path):
    summary = train(_cfg(), tmp_path / "run", progress=False)
    losses = _losses(tmp_path / "run")
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])  # it learns
    assert summary["val_rmse"] == pytest.approx(np.sqrt(summary["val_loss"]), rel=1e-6)  # the family's own metrics
    assert summary["N"] == count_params(_cfg().model)["N"] and summary["D"] == 30 * 16
    assert "| val_rmse |" in (tmp_path / "run" / "report.md").read_text()
    assert not (tmp_path / "run" / "tokenizer").exists()  # no vocabulary, nothing copied


def test_a_non_text_family_resumes_exactly(tmp_path):
    full = train(_cfg(), tmp_path / "full", progress=False)
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step_00000030")  # as if killed between steps 20 and 30
    resumed = train(_cfg(), tmp_path / "part", resume=True, progress=False)
    assert len(_losses(tmp_path / "part")) == 30
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    assert resumed["val_loss"] == full["val_loss"]


def test_unknown_kind_and_family_are_named(tmp_path):
    cfg = _cfg()
    cfg.data.kind = "pictures"
    with pytest.raises(ConfigError, match=r"data.kind='pictures' is not a known kind.*tokens"):
        train(cfg, tmp_path / "a", progress=False)
    cfg = _cfg()
    cfg.model.family = "step9"
    with pytest.raises(ConfigError, match=r"model.family='step9' is not a known model family.*step1"):
        train(cfg, tmp_path / "b", progress=False)
