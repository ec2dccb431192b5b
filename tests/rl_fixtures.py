"""The tiny countdown model the RL and test-time-scaling tests share."""
from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def countdown_run(tmp_path_factory):
    """A ~0.1M-parameter model trained a few steps on countdown text (prompt + reference answer)."""
    from steplab.config import resolve
    from steplab.data.prepare import prepare_data
    from steplab.tasks import get_task
    from steplab.train.trainer import train
    from conftest import tiny_overrides

    root = tmp_path_factory.mktemp("rl")
    items = get_task("countdown3").items("train", 400, seed=0)
    (root / "cd.jsonl").write_text("".join(json.dumps({"text": f"{i.prompt} {i.answer}"}) + "\n" for i in items))
    prepare_data(str(root / "cd.jsonl"), root / "data", vocab_size=300, progress=False)
    cfg = resolve("step1-nano", overrides=tiny_overrides(root / "data", steps=30, **{"train.dtype": "fp32", "train.ckpt_every": 30}))
    train(cfg, root / "base", progress=False)
    return root / "base"
