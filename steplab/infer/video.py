"""Text-to-video inference: load a video run (VAE or DiT), generate clips, write them as GIF or MP4 (issue 21)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from steplab.config import RunConfig
from steplab.errors import CheckpointError, ConfigError

FORMATS = {".gif": "GIF", ".mp4": "MP4 (needs imageio-ffmpeg)"}


def is_video_run(run_dir: str | Path) -> bool:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return False
    return json.loads(path.read_text()).get("model", {}).get("family", "") in ("video-vae", "video-dit")


def load_video_run(run_dir: str | Path, average: bool = True):
    """(config, model in eval mode) from a video-vae or video-dit run's latest checkpoint; a DiT trained with
    ``video.ema`` samples with its averaged weights unless ``average=False``."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.json); pass the --out of a `steplab train` run")
    raw = json.loads((run_dir / "config.json").read_text())
    cfg = RunConfig.from_dict(raw)
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "model.safetensors").is_file())
    if not ckpts:
        raise CheckpointError(f"{run_dir} has no complete checkpoint yet; train it first")
    state = load_file(str(ckpts[-1] / "model.safetensors"))
    if any(k.startswith("patch_in.") for k in state):
        from steplab.models.dit import VideoDiT

        model = VideoDiT(_without_vae_run(cfg).model)  # the checkpoint carries the VAE and latent statistics
    else:
        from steplab.models.video import VideoVAE

        model = VideoVAE(cfg.model)
    model.load_state_dict(state)
    if average and hasattr(model, "use_average"):
        model.use_average()
    return cfg, model.eval()


def _without_vae_run(cfg: RunConfig) -> RunConfig:
    import dataclasses

    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, video=dataclasses.replace(cfg.model.video, vae_run="")))


def check_out_path(out: str | Path) -> str:
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"--out {out}: video files must end in {' or '.join(FORMATS)}")
    if suffix == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise ConfigError("writing .mp4 needs imageio-ffmpeg (pip install imageio-ffmpeg); or write a .gif") from None
    return suffix


def clip_bytes(clip: torch.Tensor, suffix: str, fps: int = 8, scale: int = 4) -> bytes:
    """A (T, H, W) clip in [0, 1] -> GIF or MP4 bytes, each pixel scaled up ``scale`` times (nearest)."""
    import imageio.v3 as iio

    frames = (clip.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    if suffix == ".gif":
        return iio.imwrite("<bytes>", frames, extension=".gif", duration=1000 // fps, loop=0)
    rgb = np.repeat(frames[..., None], 3, axis=-1)  # H.264 players want 3 channels, even sides (ours are)
    return iio.imwrite("<bytes>", rgb, extension=".mp4", fps=fps)


def write_clip(clip: torch.Tensor, out: str | Path, fps: int = 8) -> Path:
    """Atomically write the clip (a temporary file in the same directory, then renamed)."""
    out = Path(out)
    data = clip_bytes(clip, check_out_path(out), fps=fps)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, out)
    return out
