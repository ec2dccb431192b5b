"""Checkpoints: safetensors weights + sharded model/optimizer state + RNG + data position, written atomically.

A checkpoint is a directory ``checkpoints/step_00000100/`` holding

- ``model.safetensors``: the full weights, for sampling, serving and export;
- ``dcp/``: model and optimizer state through ``torch.distributed.checkpoint``, one file per rank, which
  reshards on load, so a run saved by K processes resumes in any number of processes (one included);
- ``rng.pt`` and ``state.json`` (step, data loader position, training seconds).

It is assembled under a hidden temporary name and renamed into place only when every file is written and
synced, so a crash mid-write leaves the previous checkpoint as the latest complete one.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict

from steplab.errors import CheckpointError

FILES = ("model.safetensors", "state.json", "rng.pt", "dcp/.metadata")


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


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")) + [path]:
        _fsync_dir(p)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded weights on CPU (a collective under FSDP); tied weights once, as safetensors requires."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def _quiet_dcp(fn, *args, **kwargs):
    # DCP warns that it assumes a single process when no process group exists: that is what we want.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*single process.*")
        return fn(*args, **kwargs)


def install_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final``; re-saving a step (after a resume) swaps only once the
    new one is whole, so a crash at any point leaves one complete copy."""
    if final.exists():
        old = final.parent / f".tmp-old-{final.name}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep_last: int = 2, dist_info=None, keep_steps=frozenset()) -> Path:
    """Collective under torchrun: every rank writes its shard; rank 0 writes the rest and renames.
    ``keep_steps``: checkpoints of these steps are never pruned (nor counted in ``keep_last``)."""
    from steplab.train.distributed import barrier

    main = dist_info is None or dist_info.is_main
    root = checkpoint_dir(run_dir)
    tmp = root / f".tmp-step_{step:08d}"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier(dist_info)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    _quiet_dcp(dcp.save, {"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    weights = full_weights(model)
    final = root / f"step_{step:08d}"
    if main:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"step": str(step)})
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        _fsync_tree(tmp)
        install_dir(tmp, final)
        _fsync_dir(root)
        rolling = [p for p in list_checkpoints(run_dir) if int(p.name[5:]) not in keep_steps or p == final]
        for old in rolling[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    barrier(dist_info)
    return final


def _check_files(path: Path, names) -> None:
    missing = [name for name in names if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}; {_hint(path)}")


def _hint(path: Path) -> str:
    return f"delete {path} to fall back to the previous checkpoint, or start a new run"


def _check_shapes(path: Path, model: torch.nn.Module) -> None:
    """Compare the saved tensor shapes with the model's before loading anything (cheap: header only)."""
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupted ({type(e).__name__}: {e}); {_hint(path)}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):  # not every family has a decoder cfg
        expected.pop("lm_head.weight", None)
    if expected != got:
        diff = sorted(set(expected) ^ set(got)) or [k for k in expected if expected[k] != got[k]]
        raise CheckpointError(f"checkpoint {path} does not match the model config (first differences: {diff[:3]}); "
                              f"was it written by another config?")


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore weights (and, with an optimizer, optimizer + RNG for resuming); return state.json.

    Resuming reads the sharded ``dcp/`` state, resharding to this run's world size; weights alone come from
    ``model.safetensors``. Damage of either kind is a CheckpointError naming the checkpoint.
    """
    path = Path(path)
    _check_files(path, FILES if optimizer is not None else ("model.safetensors", "state.json"))
    try:
        state = json.loads((path / "state.json").read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise CheckpointError(f"checkpoint {path}/state.json is corrupted ({e}); {_hint(path)}") from None
    _check_shapes(path, model)
    if optimizer is None:
        try:
            weights = load_file(str(path / "model.safetensors"))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} is corrupted ({type(e).__name__}: {e}); {_hint(path)}") from None
        if getattr(getattr(model, "cfg", None), "tie_embeddings", False):  # not every family has a decoder cfg
            weights["lm_head.weight"] = weights["tok_emb.weight"]
        model.load_state_dict(weights)
        return state
    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        _quiet_dcp(dcp.load, {"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / "dcp"))
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    except (Exception, CheckpointException) as e:  # many types for truncated or garbled files; DCP's is a BaseException
        raise CheckpointError(f"checkpoint {path} is corrupted ({type(e).__name__}: {str(e)[:200]}); {_hint(path)}") from None
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    _set_rng_state(rng)
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
    if (run_dir / "quant.json").is_file():  # written by `steplab quantize`: int8/int4 weights (infer/quant.py)
        from steplab.infer.quant import load_quantized_run

        return load_quantized_run(run_dir, device=device, checkpoint=checkpoint)
    cfg = RunConfig.from_dict(json.loads(config_path.read_text()))
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"{run_dir} has no complete checkpoint yet; train it first or wait for the first checkpoint")
    model = build_model(cfg.model)
    state = load_weights(path, model)
    return cfg, model.to(device).eval(), Tokenizer.load(run_dir / "tokenizer"), state["step"]
