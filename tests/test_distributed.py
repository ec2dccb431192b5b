"""torchrun with 2 CPU processes (gloo): FSDP2 and DDP follow the single-process loss curve, and
checkpoints move between world sizes in both directions."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import tiny_overrides
from steplab.config import resolve
from steplab.train.checkpoint import list_checkpoints
from steplab.train.metrics import read_jsonl
from steplab.train.trainer import train

STEPS = 6


def overrides(data):
    return tiny_overrides(data, steps=STEPS, **{"train.dtype": "fp32", "train.eval_every": STEPS})


def losses(run):
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl")]


def torchrun(data, out, parallel, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "steplab",
           "train", "--quiet", "--parallel", parallel, "--out", str(out), *[f"--set={o}" for o in overrides(data)], *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def roll_back(run, to_step):
    for ckpt in list_checkpoints(run):
        if int(ckpt.name[5:]) > to_step:
            shutil.rmtree(ckpt)


@pytest.fixture(scope="module")
def single(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("dist") / "single"
    train(resolve(overrides=overrides(tiny_data)), run, progress=False)
    return run


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_processes_match_single_process(parallel, single, tiny_data, tmp_path):
    torchrun(tiny_data, tmp_path / parallel, parallel)
    assert losses(tmp_path / parallel) == pytest.approx(losses(single), abs=1e-5)


def test_fsdp_checkpoint_resumes_in_one_process_and_back(single, tiny_data, tmp_path):
    # 2 processes -> 1 process
    run = tmp_path / "two_to_one"
    torchrun(tiny_data, run, "fsdp")
    roll_back(run, 2)
    train(resolve(overrides=overrides(tiny_data)), run, resume=True, progress=False)
    assert losses(run) == pytest.approx(losses(single), abs=1e-5)
    # 1 process -> 2 processes
    run = tmp_path / "one_to_two"
    shutil.copytree(single, run)
    roll_back(run, 2)
    torchrun(tiny_data, run, "fsdp", "--resume")
    assert losses(run) == pytest.approx(losses(single), abs=1e-5)
