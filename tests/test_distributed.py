"""torchrun with 2 CPU processes (gloo): FSDP2 and DDP follow the single-process loss curve, and
checkpoints move between world sizes in both directions."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

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


def test_moe_under_fsdp_matches_single_process(tiny_data, tmp_path):
    moe = ["--set=model.moe.n_experts=4", "--set=model.moe.top_k=2", "--set=model.moe.n_shared=1", "--set=model.moe.d_expert=32",
           "--set=model.moe.bias_update_rate=0.01"]
    torchrun(tiny_data, tmp_path / "fsdp", "fsdp", *moe)
    single = resolve(overrides=overrides(tiny_data) + [m.removeprefix("--set=") for m in moe])
    train(single, tmp_path / "single", progress=False)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "single"), abs=1e-5)
    # The balancing biases moved, and identically to the single-process run (the counts were summed over ranks).
    from steplab.train.checkpoint import load_run
    _, a, _, _ = load_run(tmp_path / "fsdp")
    _, b, _, _ = load_run(tmp_path / "single")
    for (_, x), (_, y) in zip(a.moe_layers(), b.moe_layers()):
        assert x.expert_bias.abs().sum() > 0 and torch.allclose(x.expert_bias, y.expert_bias)


def test_moe_under_ddp_with_gradient_accumulation_matches_single_process(tiny_data, tmp_path):
    # Under DDP's default broadcast_buffers=True, rank 0's expert counts overwrote the others' at every
    # micro-batch: the loads summed over ranks then differed from the single process's.
    moe = ["model.moe.n_experts=4", "model.moe.top_k=2", "model.moe.n_shared=1", "model.moe.d_expert=32",
           "model.moe.bias_update_rate=0.01", "train.grad_accum=2"]
    torchrun(tiny_data, tmp_path / "ddp", "ddp", *[f"--set={m}" for m in moe])
    train(resolve(overrides=overrides(tiny_data) + moe), tmp_path / "single", progress=False)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), abs=1e-5)
    load_stats = [[{k: v for k, v in r.items() if k.endswith(("load_max_mean", "entropy"))}
                   for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] for run in (tmp_path / "ddp", tmp_path / "single")]
    assert load_stats[0][0] and load_stats[0] == load_stats[1]  # the expert loads, step by step
    from steplab.train.checkpoint import load_run
    _, a, _, _ = load_run(tmp_path / "ddp")
    _, b, _, _ = load_run(tmp_path / "single")
    for (_, x), (_, y) in zip(a.moe_layers(), b.moe_layers()):
        assert x.expert_bias.abs().sum() > 0 and torch.equal(x.expert_bias, y.expert_bias)
