"""RL checkpoints: everything an exact resume needs, written atomically like ``steplab.train.checkpoint``.

``checkpoints/step_00000010/`` holds ``model.safetensors`` (the policy, so ``load_run``, ``steplab eval``,
``serve`` and ``export`` read an RL run like any run), ``state.json`` (step, rollout position, tokens, seconds)
and ``rl.pt`` (critic weights, both optimizers, the torch RNG). It is assembled under a hidden temporary name
and renamed into place once complete and synced, so a kill mid-write leaves the previous checkpoint as latest.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from steplab.errors import CheckpointError
from steplab.train.checkpoint import (checkpoint_dir, full_weights, install_dir, latest_checkpoint, list_checkpoints,
                                      load_weights)


def save_rl_checkpoint(run_dir: Path, step: int, policy, critic, policy_opt, critic_opt, state: dict[str, Any],
                       keep_last: int = 2) -> Path:
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp, final = root / f".tmp-step_{step:08d}", root / f"step_{step:08d}"
    tmp.mkdir()
    save_file(full_weights(policy), str(tmp / "model.safetensors"), metadata={"step": str(step)})
    torch.save({"critic": critic.state_dict(), "policy_opt": policy_opt.state_dict(),
                "critic_opt": critic_opt.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / "rl.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    for p in list(tmp.iterdir()) + [tmp]:
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    install_dir(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return final


def load_rl_checkpoint(path: Path, policy, critic, policy_opt, critic_opt) -> dict[str, Any]:
    """Restore everything saved by :func:`save_rl_checkpoint`; return its state.json."""
    if not (path / "rl.pt").is_file():
        raise CheckpointError(f"checkpoint {path} has no rl.pt (not an RL checkpoint, or incomplete); delete it to "
                              "fall back to the previous one, or start a new run")
    state = load_weights(path, policy)
    try:
        saved = torch.load(path / "rl.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or garbled file
        raise CheckpointError(f"checkpoint {path}/rl.pt is corrupted ({type(e).__name__}); delete {path} to fall back "
                              "to the previous checkpoint") from None
    critic.load_state_dict(saved["critic"])
    policy_opt.load_state_dict(saved["policy_opt"])
    critic_opt.load_state_dict(saved["critic_opt"])
    torch.set_rng_state(saved["torch_rng"])
    return state


__all__ = ["save_rl_checkpoint", "load_rl_checkpoint", "latest_checkpoint"]
