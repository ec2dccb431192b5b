"""Shared fixtures: a tiny prepared dataset (stdlib corpus) and tiny configs; everything made in tmp dirs."""
from __future__ import annotations

import os
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning threads of one process
# starve the others (a 40-token generation took 7 s instead of 0.07 s). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Small, fixed thread count: CI has 2 cores and determinism tests compare bits.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from steplab.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("tiny") / "data"
    prepare_data("stdlib", out, vocab_size=512, max_bytes=400_000, progress=False)
    return out


def tiny_overrides(data: Path, steps: int = 8, **extra) -> list[str]:
    """A ~0.1M-parameter model that trains a step in milliseconds."""
    base = {
        "data.path": str(data), "data.seq_len": 64, "model.max_seq_len": 128, "model.d_model": 64, "model.n_layer": 2,
        "model.n_head": 4, "model.n_kv_head": 2, "train.batch_size": 4, "train.max_steps": steps, "train.warmup_steps": 2,
        "train.eval_every": 4, "train.eval_batches": 2, "train.ckpt_every": 2, "train.lr": 3e-3, "train.keep_last": 10,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
