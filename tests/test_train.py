"""Trainer: loss falls, exact resume (in-process and after SIGKILL), NaN handling, damaged checkpoints."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from steplab.config import resolve
from steplab.errors import CheckpointError, ConfigError
from steplab.train.checkpoint import latest_checkpoint, list_checkpoints, load_run
from steplab.train.metrics import read_jsonl
from steplab.train.trainer import TrainingError, train


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl")]


def test_loss_falls_and_run_directory_is_complete(tiny_data, tmp_path):
    cfg = resolve(overrides=tiny_overrides(tiny_data, steps=40, **{"train.eval_every": 20, "train.eval_batches": 1000}))
    summary = train(cfg, tmp_path / "run", progress=False)
    seq = losses(tmp_path / "run")
    assert len(seq) == 40
    assert sum(seq[-5:]) / 5 < sum(seq[:5]) / 5 - 0.5
    assert summary["val_loss"] < 6.0
    # Bits per byte agrees with loss/ln2 x tokens-per-byte of the val split (special tokens aside).
    meta = json.loads((tiny_data / "meta.json").read_text())["val"]
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / math.log(2) * meta["tokens"] / meta["bytes"], rel=0.15)
    for name in ("config.json", "summary.json", "metrics.jsonl", "loss.png", "report.md", "tokenizer/tokenizer.json"):
        assert (tmp_path / "run" / name).is_file(), name
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["N"] == summary["N"] and saved["D"] == 40 * 4 * 64
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_reproduces_uninterrupted_losses(tiny_data, tmp_path):
    import shutil

    cfg = resolve(overrides=tiny_overrides(tiny_data, steps=10))
    train(cfg, tmp_path / "run", progress=False)
    reference = losses(tmp_path / "run")
    _, ref_model, _, _ = load_run(tmp_path / "run")
    # Roll the run back to its step-6 checkpoint, as if it had died there, and resume.
    for ckpt in list_checkpoints(tmp_path / "run"):
        if int(ckpt.name[5:]) > 6:
            shutil.rmtree(ckpt)
    train(cfg, tmp_path / "run", resume=True, progress=False)
    assert losses(tmp_path / "run") == reference
    _, model, _, _ = load_run(tmp_path / "run")
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), ref_model.state_dict().values()))


def test_sigkill_mid_run_then_resume_is_bit_exact(tiny_data, tmp_path):
    args = ["--set=" + o for o in tiny_overrides(tiny_data, steps=30, **{"train.ckpt_every": 3})]
    cmd = [sys.executable, "-m", "steplab", "train", "--quiet", *args]
    subprocess.run(cmd + ["--out", str(tmp_path / "ref")], check=True, capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_jsonl(run / "metrics.jsonl")) < 13:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(losses(run)) < 30, "the run finished before it could be killed"
    subprocess.run([sys.executable, "-m", "steplab", "train", "--quiet", "--resume", "--out", str(run)], check=True, capture_output=True)
    assert losses(run) == losses(tmp_path / "ref")


def test_nan_loss_stops_with_a_clear_message_or_is_skipped(tiny_data, tmp_path):
    # A learning rate of 1e30 blows the weights up within a few steps.
    cfg = resolve(overrides=tiny_overrides(tiny_data, steps=20, **{"train.lr": 1e30, "train.grad_clip": 0, "train.warmup_steps": 1}))
    with pytest.raises(TrainingError, match=r"loss became .* at step \d+.*Lower train.lr"):
        train(cfg, tmp_path / "stop", progress=False)
    cfg.train.nan_policy = "skip"
    summary = train(cfg, tmp_path / "skip", progress=False)
    assert summary["skipped_steps"] > 0
    assert any(r.get("skipped") for r in read_jsonl(tmp_path / "skip" / "metrics.jsonl"))


def test_damaged_checkpoints_are_reported_and_nothing_is_lost(tiny_data, tmp_path):
    run = tmp_path / "run"
    cfg = resolve(overrides=tiny_overrides(tiny_data, steps=6))
    train(cfg, run, progress=False)
    latest = latest_checkpoint(run)
    weights = latest / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupted.*fall back to the previous checkpoint"):
        load_run(run)
    with pytest.raises(CheckpointError, match="corrupted"):
        train(cfg, run, resume=True, progress=False)
    shard = next((latest / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # a truncated optimizer/model shard
    weights.write_bytes(original)
    with pytest.raises(CheckpointError, match="corrupted"):
        train(cfg, run, resume=True, progress=False)
    (latest / "dcp" / ".metadata").unlink()  # partial: a file missing
    with pytest.raises(CheckpointError, match=r"incomplete: missing dcp/.metadata"):
        train(cfg, run, resume=True, progress=False)
    weights.write_bytes(original[: len(original) // 2])
    assert weights.read_bytes() == original[: len(original) // 2]  # left for the user to inspect, not overwritten
    # An interrupted save leaves only a hidden temp dir, which never counts as a checkpoint.
    (run / "checkpoints" / ".tmp-abc").mkdir()
    assert all(not p.name.startswith(".") for p in list_checkpoints(run))


def test_existing_run_is_never_overwritten(tiny_data, tmp_path):
    cfg = resolve(overrides=tiny_overrides(tiny_data, steps=2))
    train(cfg, tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before


def test_wsd_and_cosine_schedules():
    from steplab.config import TrainConfig
    from steplab.train.optim import lr_at

    cos = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110, schedule="cosine")
    assert lr_at(0, cos) == pytest.approx(0.1) and lr_at(9, cos) == pytest.approx(1.0)
    assert lr_at(109, cos) == pytest.approx(0.1)
    assert lr_at(60, cos) == pytest.approx(0.55, abs=0.01)
    wsd = TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=10, max_steps=110, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, wsd) == 1.0 and lr_at(87, wsd) == 1.0
    assert lr_at(109, wsd) == pytest.approx(0.0) and 0 < lr_at(100, wsd) < 1


def test_keep_last_k_and_tensorboard(tiny_data, tmp_path):
    cfg = resolve(overrides=tiny_overrides(tiny_data, steps=8, **{"train.keep_last": 2, "train.tensorboard": "true"}))
    train(cfg, tmp_path / "run", progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000006", "step_00000008"]
    events = list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


def test_gradient_accumulation_matches_a_bigger_batch(tiny_data, tmp_path):
    # 2 micro-batches of 2 sequences see the same windows as 1 batch of 4, so the losses agree to rounding.
    one = resolve(overrides=tiny_overrides(tiny_data, steps=4, **{"train.batch_size": 4, "train.dtype": "fp32"}))
    two = resolve(overrides=tiny_overrides(tiny_data, steps=4, **{"train.batch_size": 2, "train.grad_accum": 2, "train.dtype": "fp32"}))
    train(one, tmp_path / "one", progress=False)
    train(two, tmp_path / "two", progress=False)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-4)


@pytest.mark.slow
def test_torch_compile_training_matches_eager(tiny_data, tmp_path):
    eager = resolve(overrides=tiny_overrides(tiny_data, steps=4, **{"train.dtype": "fp32"}))
    compiled = resolve(overrides=tiny_overrides(tiny_data, steps=4, **{"train.dtype": "fp32", "train.compile": "true"}))
    train(eager, tmp_path / "eager", progress=False)
    train(compiled, tmp_path / "compiled", progress=False)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), abs=1e-3)
