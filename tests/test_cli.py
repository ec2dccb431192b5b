"""The CLI end to end: quickstart at a tiny budget, each verb, and bad input giving one-line errors + exit 2."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import tiny_overrides
from steplab.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "steplab", *args], capture_output=True, text=True)


def test_quickstart_tiny_budget_end_to_end(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--budget", "0.02", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and "bits per byte" in out and "wall time" in out and "class " in out
    assert "fit on 15 points" in out or "fit: 15 points, not yet usable" in out  # the running fit, last point
    run = tmp_path / "qs" / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_loss"] < 0.85 * math.log(1024)  # ln V = 6.93 at random init (vocab 1024)
    for name in ("config.json", "metrics.jsonl", "loss.png", "report.md", "checkpoints"):
        assert (run / name).exists(), name
    pred = json.loads((tmp_path / "qs" / "prediction.json").read_text())
    assert pred["N_span"] >= 16 and pred["seed"] == 3 and pred["measured_loss"] == summary["val_loss"]
    assert set(pred["phase_seconds"]) == {"data", "sweep", "fit", "plan", "train", "report"}
    assert pred["D"] <= pred["unique_tokens"] * 1.01 and pred["plan"]["why"]  # within the data, and says why
    if pred["predicted_loss"] is not None:
        assert pred["rel_err"] == pytest.approx(pred["predicted_loss"] / pred["measured_loss"] - 1)
    sweep = json.loads((tmp_path / "qs" / "sweep" / "sweep.json").read_text())
    assert sweep["mode"] == "wsd" and all(r["config"]["train"]["seed"] == 3 for r in sweep["runs"].values())
    assert json.loads((tmp_path / "qs" / "data" / "meta.json").read_text())["seed"] == 3
    assert summary["threads"] >= 1 and json.loads((run / "config.json").read_text())["train"]["seed"] == 3


@pytest.mark.slow  # ~2 min: the dense quickstart test above covers the loop end to end in the default run
def test_quickstart_moe_trains_step2_models(tmp_path, capsys):
    assert main(["quickstart", "--moe", "--out", str(tmp_path / "qs"), "--budget", "0.02"]) == 0
    out = capsys.readouterr().out
    assert "Step-2 MoE" in out and "N_active" in out and "experts of" in out
    table = (tmp_path / "qs" / "sweep" / "runs.csv").read_text().splitlines()
    cols = table[0].split(",")
    rows = [dict(zip(cols, line.split(","))) for line in table[1:]]
    assert len(rows) == 15 and all(r["n_experts"] == "8" and int(r["N_active"]) < int(r["N"]) for r in rows)
    run = tmp_path / "qs" / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["moe"]["n_experts"] == 8 and config["model"]["moe"]["score"] == "sigmoid"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["N_active"] < 0.5 * summary["N"] and summary["C_6ND"] == 6 * summary["N_active"] * summary["D"]
    assert summary["val_loss"] < 0.85 * math.log(1024)


def test_train_sample_eval_verbs(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--quiet", "--out", str(run)] + [f"--set={o}" for o in tiny_overrides(tiny_data, steps=6)]
    assert main(args + ["--set=train.ckpt_every=3", "--set=train.keep_last=0"]) == 0
    assert "val loss" in capsys.readouterr().out
    assert main(["sample", str(run), "--prompt", "def f(", "--temperature", "0", "--max-new-tokens", "12", "--json"]) == 0
    cached = json.loads(capsys.readouterr().out)
    assert main(["sample", str(run), "--prompt", "def f(", "--temperature", "0", "--max-new-tokens", "12", "--json", "--no-cache"]) == 0
    assert json.loads(capsys.readouterr().out) == cached and len(cached[0]["tokens"]) >= 1
    assert main(["eval", str(run), "--batches", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 6 and result["val_loss"] > 0 and result["val_bpb"] > 0
    assert main(["eval", str(run), "--batches", "2", "--checkpoint", str(run / "checkpoints" / "step_00000003")]) == 0
    earlier = json.loads(capsys.readouterr().out)  # --checkpoint is honoured, not silently the latest
    assert earlier["step"] == 3 and earlier["val_loss"] != result["val_loss"]
    assert main(["eval", str(run), "--lm-eval", "x", "--checkpoint", str(run / "checkpoints" / "step_00000003")]) == 2
    assert "--lm-eval scores the run's latest checkpoint" in capsys.readouterr().err
    assert main(["eval", str(run), "--task", "vqa"]) == 2  # a text run has no image tower
    assert "is not a Step-1V run" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["train", "--preset", "step1-huge", "--out", "X"], "unknown preset 'step1-huge'"),
    (["train", "--preset", "step1-nano", "--set", "model.n_head=5", "--out", "X"], "does not divide model.d_model"),
    (["train", "--preset", "step1-nano", "--set", "model.nope=1", "--out", "X"], "unknown config key 'model.nope'"),
    (["train", "--preset", "step1-nano", "--set", "model.vocab_size=100", "--out", "X"], "smaller than 256 bytes + 7 special"),
    (["train", "--preset", "step1-nano", "--data", "/nonexistent/data", "--out", "X"], "is not a prepared dataset"),
    (["data", "prepare", "--source", "/nonexistent/corpus", "--out", "X"], "/nonexistent/corpus"),
    (["sample", "/nonexistent/run"], "not a run directory"),
])
def test_bad_input_gives_one_line_error_and_exit_2(argv, message, tmp_path):
    argv = [a if a != "X" else str(tmp_path / "out") for a in argv]
    result = run_cli(*argv)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # progress bars may precede it; the error is one line
    assert last.startswith("error: ") and message in last
    assert not (tmp_path / "out").exists()


def test_bad_corpora(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("data", "prepare", "--source", str(empty), "--out", str(tmp_path / "o1"))
    assert r.returncode == 2 and "no text" in r.stderr
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("hello world " * 200)
    (mixed / "b.bin").write_bytes(b"\x00\x01\x02binary" * 100)
    r = run_cli("data", "prepare", "--source", str(mixed), "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "b.bin" in r.stderr
    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "a.txt").write_text("hello world " * 200)
    (latin / "c.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    r = run_cli("data", "prepare", "--source", str(latin), "--out", str(tmp_path / "o3"))
    assert r.returncode == 2 and "c.txt" in r.stderr and "UTF-8" in r.stderr
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


def test_truncated_shard_is_reported(tiny_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = sorted((data / "train").glob("*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    r = run_cli("train", "--out", str(tmp_path / "run"), *[f"--set={o}" for o in tiny_overrides(data, steps=2)])
    assert r.returncode == 2 and shard.name in r.stderr and "re-run `steplab data prepare`" in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_corrupted_checkpoint_via_cli(tiny_data, tmp_path):
    run = tmp_path / "run"
    overrides = [f"--set={o}" for o in tiny_overrides(tiny_data, steps=4)]
    assert run_cli("train", "--quiet", "--out", str(run), *overrides).returncode == 0
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    r = run_cli("train", "--quiet", "--resume", "--out", str(run))
    assert r.returncode == 2 and "corrupted" in r.stderr and str(ckpt) in r.stderr
    assert (ckpt / "model.safetensors").read_bytes() == b"garbage"
    assert len(list((run / "checkpoints").glob("step_*"))) >= 2  # older checkpoints kept
