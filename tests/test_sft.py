"""`steplab sft` through the one trainer: a tiny base run fine-tuned on conversations, loss on assistant tokens,
exact resume, NaN-free with over-long conversations, the CLI verb, and a chat eval with format adherence."""
from __future__ import annotations

import json
import random

import pytest

from conftest import tiny_overrides


@pytest.fixture(scope="module")
def base_run(tiny_data, tmp_path_factory):
    from steplab.config import resolve
    from steplab.train.trainer import train

    out = tmp_path_factory.mktemp("sft") / "base"
    train(resolve(overrides=tiny_overrides(tiny_data, steps=4) + ["train.threads=1"]), out, progress=False)
    return out


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    rows = []
    for i in range(120):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        reply = f"Answer: {a + b}" + (" and a long digression" * 40 if i % 10 == 0 else "")  # some longer than a row
        rows.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                  {"role": "assistant", "content": reply}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_overrides(steps: int) -> list[str]:
    return [f"train.max_steps={steps}", "train.batch_size=4", "data.seq_len=64", "train.eval_every=2",
            "train.ckpt_every=2", "train.eval_batches=2", "train.keep_last=10", "train.threads=1", "train.warmup_steps=1"]


def test_sft_trains_on_assistant_tokens_and_resumes_exactly(base_run, chat_file, tmp_path):
    import math

    from steplab.train.sft import sft_config
    from steplab.train.trainer import train

    cfg = sft_config(base_run, str(chat_file), sft_overrides(4))
    assert cfg.data.kind == "chat" and cfg.train.init_from == str(base_run) and cfg.data.chat.mask
    full = train(cfg, tmp_path / "full", progress=False)
    assert math.isfinite(full["val_loss"])
    log = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)

    # roll the run back to its step-2 checkpoint, as if it had died there, and resume: the chat data replays
    import shutil

    from steplab.train.checkpoint import list_checkpoints

    for ckpt in list_checkpoints(tmp_path / "full"):
        if int(ckpt.name[5:]) > 2:
            shutil.rmtree(ckpt)
    train(cfg, tmp_path / "full", resume=True, progress=False)
    again = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in again if "loss" in r] == losses  # bit-identical after resume
    assert (tmp_path / "full" / "tokenizer" / "tokenizer_config.json").is_file()


def test_sft_cli_and_chat_eval(base_run, chat_file, tmp_path, capsys):
    from steplab.cli import main
    from steplab.eval.runner import EngineLM
    from steplab.eval.task_eval import run_task
    from steplab.tasks import get_task

    out = tmp_path / "chat"
    assert main(["sft", "--from", str(base_run), "--data", str(chat_file), "--out", str(out), "--steps", "2", "--quiet",
                 "--no-mask", *sum((["--set", s] for s in sft_overrides(2)[1:]), [])]) == 0
    assert "assistant-token val loss" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["data"]["chat"]["mask"] is False
    with EngineLM.from_run(out, device="cpu", dtype="fp32") as lm:
        r = run_task(lm, get_task("recall"), 6, keep_outputs=True)
    assert r.n == 6 and 0 <= r.format_ok <= 6 and r.format_rate == r.format_ok / 6 and len(r.outputs) == 6
    with pytest.raises(SystemExit):
        main(["sft", "--out", str(tmp_path / "x")])  # --from is required
    assert main(["sft", "--from", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
