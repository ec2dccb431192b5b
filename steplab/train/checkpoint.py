"""Checkpoints: safetensors weights + optimizer + RNG + data position, written atomically, keep-last-k.

A checkpoint is a directory ``checkpoints/step_00000100/`` holding ``model.safetensors``, ``optimizer.pt``
and ``state.json``. It is assembled under a temporary name and renamed into place only when every file is
written and synced, so a crash mid-write leaves the previous checkpoint as the latest complete one and a
``.tmp`` directory that the next save clears away.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from steplab.errors import CheckpointError

FILES = ("model.safetensors", "optimizer.pt", "state.json")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories from interrupted saves are skipped)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights to save: tied weights once (safetensors refuses shared storage), contiguous, on CPU."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep_last: int = 2) -> Path:
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    save_file(model_state(model), str(tmp / "model.safetensors"), metadata={"step": str(step)})
    torch.save({"optimizer": optimizer.state_dict(), "rng": _rng_state()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    for name in FILES:
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    final = root / f"step_{step:08d}"
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it only once the new one is whole
        old = root / f".tmp-old-{final.name}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore weights (and optimizer + RNG when given); return state.json. Damage -> CheckpointError."""
    path = Path(path)
    hint = f"delete {path} to fall back to the previous checkpoint, or start a new run"
    missing = [name for name in (FILES if optimizer is not None else FILES[:1] + FILES[2:]) if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}; {hint}")
    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "model.safetensors"))
    except (SafetensorError, json.JSONDecodeError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupted ({type(e).__name__}: {e}); {hint}") from None
    if getattr(model.cfg, "tie_embeddings", False):
        weights["lm_head.weight"] = weights["tok_emb.weight"]
    expected = {k: v.shape for k, v in model.state_dict().items()}
    got = {k: v.shape for k, v in weights.items()}
    if expected != got:
        diff = sorted(set(expected) ^ set(got)) or [k for k in expected if expected[k] != got[k]]
        raise CheckpointError(f"checkpoint {path} does not match the model config (first differences: {diff[:3]}); "
                              f"was it written by another config?")
    model.load_state_dict(weights)
    if optimizer is not None:
        try:
            extra = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for truncated or garbled pickles
            raise CheckpointError(f"checkpoint {path}/optimizer.pt is corrupted ({type(e).__name__}); {hint}") from None
        optimizer.load_state_dict(extra["optimizer"])
        _set_rng_state(extra["rng"])
    return state


def load_weights(path: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    return load_checkpoint(path, model, optimizer=None)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_run(run_dir: str | Path, device: str = "cpu", checkpoint: str | Path | None = None):
    """(config, model in eval mode, tokenizer, step) from a run directory's latest complete checkpoint."""
    from steplab.config import RunConfig
    from steplab.data.tokenizer import Tokenizer
    from steplab.models import build_model

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.json); pass the --out of a `steplab train` run")
    cfg = RunConfig.from_dict(json.loads(config_path.read_text()))
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"{run_dir} has no complete checkpoint yet; train it first or wait for the first checkpoint")
    model = build_model(cfg.model)
    state = load_weights(path, model)
    return cfg, model.to(device).eval(), Tokenizer.load(run_dir / "tokenizer"), state["step"]
