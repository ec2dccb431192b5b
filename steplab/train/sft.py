"""``steplab sft``: supervised fine-tuning on conversations, through the one trainer.

An SFT run is an ordinary run: the base run's model config, data kind "chat" (packed conversations, loss on
assistant tokens: ``steplab.data.chat_data``), ``train.init_from`` the base run, and the schedule below
(SFT moves a pretrained model a short way: a lower peak lr than pretraining, short warmup, no weight decay).
Checkpoints, exact resume, metrics, the progress bar and the report are the trainer's.
"""
from __future__ import annotations

import json
from pathlib import Path

from steplab.config import RunConfig, _deep_update, parse_overrides
from steplab.errors import ConfigError

SFT_DEFAULTS: dict = {
    "train": {"lr": 1e-3, "warmup_steps": 10, "max_steps": 300, "schedule": "cosine", "min_lr_ratio": 0.1,
              "weight_decay": 0.0, "eval_every": 100, "eval_batches": 4, "ckpt_every": 100},
}


def sft_config(base_run: str | Path, data: str, overrides: list[str] | None = None, *, mask: bool = True) -> RunConfig:
    """The run config of SFT from ``base_run`` on ``data`` ("builtin", a .jsonl/.parquet file, or hf:NAME):
    the base's model and sequence length, SFT_DEFAULTS, then ``--set`` overrides."""
    base_dir = Path(base_run)
    saved = base_dir / "config.json"
    if not saved.is_file():
        raise ConfigError(f"--from {base_run} is not a run directory (no config.json); pass a run made by "
                          "`steplab train` or `steplab import hf`")
    base = json.loads(saved.read_text())
    raw = {
        "model": base["model"],
        "data": {"kind": "chat", "path": data, "seq_len": base["data"]["seq_len"], "chat": {"mask": mask}},
        "train": {**SFT_DEFAULTS["train"], "init_from": str(base_dir), "batch_size": base["train"]["batch_size"],
                  "dtype": base["train"]["dtype"]},
    }
    raw = _deep_update(raw, parse_overrides(overrides or []))
    return RunConfig.from_dict(raw).validate()
