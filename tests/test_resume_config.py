"""--resume refuses a config that would break exact resume (naming each changed field) unless
--allow-config-change, which records the change; init_from branches, with or without the optimizer state."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_overrides
from steplab.config import resolve
from steplab.errors import ConfigError
from steplab.models import build_model
from steplab.train.checkpoint import latest_checkpoint, load_checkpoint
from steplab.train.metrics import read_jsonl
from steplab.train.optim import build_optimizer
from steplab.train.trainer import init_from_run, train


@pytest.fixture(scope="module")
def run4(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("resume") / "run"
    train(resolve(overrides=tiny_overrides(tiny_data, steps=4)), run, progress=False)
    return run


def test_resume_with_changed_training_config_is_refused_naming_each_field(run4, tiny_data):
    saved = (run4 / "config.json").read_text()
    cfg = resolve(overrides=tiny_overrides(tiny_data, steps=4, **{"train.lr": 1e-3, "train.batch_size": 8, "train.seed": 1}))
    with pytest.raises(ConfigError) as e:
        train(cfg, run4, resume=True, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "--allow-config-change" in msg
    for field in ("train.lr (0.003 -> 0.001)", "train.batch_size (4 -> 8)", "train.seed (0 -> 1)"):
        assert field in msg
    assert (run4 / "config.json").read_text() == saved  # nothing overwritten
    other = tiny_data.parent / "other_data"  # the same dataset under another name: still a different data.path
    if not other.exists():
        other.symlink_to(tiny_data, target_is_directory=True)
    cfg = resolve(overrides=tiny_overrides(tiny_data, steps=4) + [f"data.path={other}"])
    with pytest.raises(ConfigError, match="data.path"):
        train(cfg, run4, resume=True, progress=False)


def test_model_change_is_refused_even_when_allowed(run4, tiny_data):
    cfg = resolve(overrides=tiny_overrides(tiny_data, steps=4, **{"model.rope_base": 5000.0}))
    with pytest.raises(ConfigError, match=r"cannot change the model \(model.rope_base"):
        train(cfg, run4, resume=True, progress=False, allow_config_change=True)


def test_logging_cadence_may_change_on_resume(run4, tiny_data):
    cfg = resolve(overrides=tiny_overrides(tiny_data, steps=4, **{"train.log_every": 2, "train.keep_last": 3}))
    train(cfg, run4, resume=True, progress=False)  # no error: these never change what is computed


def test_allowed_change_is_recorded_in_metrics_and_report(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(resolve(overrides=tiny_overrides(tiny_data, steps=4)), run, progress=False)
    cfg = resolve(overrides=tiny_overrides(tiny_data, steps=6, **{"train.lr": 1e-3}))
    train(cfg, run, resume=True, progress=False, allow_config_change=True)
    events = [r for r in read_jsonl(run / "metrics.jsonl") if "config_change" in r]
    assert events == [{"step": 4, "config_change": {"train.max_steps": [4, 6], "train.lr": [0.003, 0.001]}}]
    report = (run / "report.md").read_text()
    assert "Config changed on resume at step 4" in report and "`train.lr` 0.003 -> 0.001" in report
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == 0.001


def test_init_from_branches_with_or_without_the_optimizer_state(run4, tiny_data):
    cfg = resolve(overrides=tiny_overrides(tiny_data, steps=4))
    cfg.model.vocab_size = json.loads((run4 / "config.json").read_text())["model"]["vocab_size"]
    ref_model = build_model(cfg.model)
    ref_opt = build_optimizer(ref_model, cfg.train, "cpu")
    load_checkpoint(latest_checkpoint(run4), ref_model, ref_opt)

    model = build_model(cfg.model)
    init_from_run(model, run4)  # weights only
    opt = build_optimizer(model, cfg.train, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()))
    assert not opt.state  # fresh AdamW

    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.train, "cpu")
    init_from_run(model, run4, opt)
    moments = [(opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"]) for p, q in zip(model.parameters(), ref_model.parameters())]
    assert moments and all(torch.equal(a, b) and a.abs().sum() > 0 for a, b in moments)


def test_init_from_refuses_a_dataset_with_another_tokenizer(run4, tiny_data, tmp_path):
    from steplab.data.prepare import prepare_data

    other = tmp_path / "other"
    prepare_data("stdlib", other, vocab_size=300, max_bytes=100_000, progress=False)
    cfg = resolve(overrides=tiny_overrides(other, steps=2) + [f"train.init_from={run4}"])
    with pytest.raises(ConfigError, match=r"another tokenizer than train.init_from=.*steplab data prepare --tokenizer"):
        train(cfg, tmp_path / "branch", progress=False)
    # the same tokenizer (the dataset the source was trained on) is accepted
    train(resolve(overrides=tiny_overrides(tiny_data, steps=2) + [f"train.init_from={run4}"]), tmp_path / "ok", progress=False)
