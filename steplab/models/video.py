"""Step-Video's Video-VAE, small: causal 3D convolutions, a KL bottleneck, the first frame encoded on its own.

Causal in time: every 3D convolution pads only the past (with copies of the first frame), so the latent of
frame t never sees frames after t, and the first frame's latent sees the first frame alone: a 1 + 4k frame
clip becomes 1 + k latent frames (Step-Video-T2V: 16x16 spatial, 8x temporal; our presets 4x4 and 4x).
Normalisation is per frame (GroupNorm over each frame), which keeps causality.

Temporal down-sampling keeps frame 0 and averages the others in pairs; up-sampling keeps frame 0 and
repeats the others: so ``frames = 1 + k * temporal_down`` round-trips exactly.

Training: ``forward(x)`` with ``x`` of shape (B, 1, T, H, W) in [-1, 1] returns the loss: per-element
reconstruction MSE plus ``kl_weight`` times the per-element KL to N(0, I).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from steplab.config import ModelConfig, VideoConfig
from steplab.errors import ConfigError


class CausalConv3d(nn.Conv3d):
    """3x3x3 (or 1x1x1) convolution padded causally in time, symmetrically in space."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1):
        super().__init__(c_in, c_out, kernel, stride=(1, stride, stride), padding=(0, kernel // 2, kernel // 2))
        self.time_pad = kernel - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_pad:
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1), x], dim=2)
        return super().forward(x)


class FrameNorm(nn.GroupNorm):
    """GroupNorm over each frame on its own (a norm over time would leak the future into the past)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.view(b, t, c, h, w).transpose(1, 2)


def norm(c: int) -> FrameNorm:
    return FrameNorm(min(8, c), c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), CausalConv3d(c_in, c_out)
        self.norm2, self.conv2 = norm(c_out), CausalConv3d(c_out, c_out)
        self.skip = CausalConv3d(c_in, c_out, kernel=1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


def time_down(x: torch.Tensor) -> torch.Tensor:
    """Frame 0 alone, then the mean of each later pair: 1 + 2k frames -> 1 + k."""
    rest = x[:, :, 1:]
    b, c, t, h, w = rest.shape
    return torch.cat([x[:, :, :1], rest.view(b, c, t // 2, 2, h, w).mean(3)], dim=2)


def time_up(x: torch.Tensor) -> torch.Tensor:
    """Inverse shape of time_down: 1 + k frames -> 1 + 2k (frame 0 kept, each later frame repeated)."""
    return torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(2, dim=2)], dim=2)


class Down(nn.Module):
    def __init__(self, c_in: int, c_out: int, in_time: bool):
        super().__init__()
        self.conv, self.in_time = CausalConv3d(c_in, c_out, stride=2), in_time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return time_down(x) if self.in_time else x


class Up(nn.Module):
    def __init__(self, c_in: int, c_out: int, in_time: bool):
        super().__init__()
        self.conv, self.in_time = CausalConv3d(c_in, c_out), in_time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = time_up(x) if self.in_time else x
        b, c, t, h, w = x.shape
        x = F.interpolate(x.transpose(1, 2).reshape(b * t, c, h, w), scale_factor=2, mode="nearest")
        return self.conv(x.view(b, t, c, 2 * h, 2 * w).transpose(1, 2))


def levels(v: VideoConfig) -> tuple[int, int]:
    """(spatial down blocks, of which the first ones also halve time)."""
    ns, nt = int(round(math.log2(v.spatial_down))), int(round(math.log2(v.temporal_down)))
    if 2 ** ns != v.spatial_down or 2 ** nt != v.temporal_down or nt > ns:
        raise ConfigError(f"model.video.spatial_down={v.spatial_down} and temporal_down={v.temporal_down} must be powers "
                          f"of 2 with temporal_down <= spatial_down")
    return ns, nt


def check_shape(v: VideoConfig) -> None:
    levels(v)
    if (v.frames - 1) % v.temporal_down or v.size % v.spatial_down:
        raise ConfigError(f"model.video.frames={v.frames} must be 1 + a multiple of temporal_down={v.temporal_down} and "
                          f"size={v.size} a multiple of spatial_down={v.spatial_down}")


class VideoVAE(nn.Module):
    """Encoder: conv_in -> [Down -> ResBlock] x levels -> (mean, logvar). Decoder mirrors it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        v = self.v = cfg.video
        check_shape(v)
        ns, nt = levels(v)
        widths = [max(8, v.channels // 2 ** (ns - i)) for i in range(ns + 1)]  # full res narrowest, bottom = channels
        self.conv_in = CausalConv3d(1, widths[0])
        self.down = nn.ModuleList(nn.Sequential(Down(widths[i], widths[i + 1], i < nt), ResBlock(widths[i + 1], widths[i + 1]))
                                  for i in range(ns))
        self.enc_out = nn.Sequential(norm(widths[-1]), nn.SiLU(), CausalConv3d(widths[-1], 2 * v.z_channels))
        self.dec_in = nn.Sequential(CausalConv3d(v.z_channels, widths[-1]), ResBlock(widths[-1], widths[-1]))
        self.up = nn.ModuleList(nn.Sequential(Up(widths[i + 1], widths[i], i < nt), ResBlock(widths[i], widths[i]))
                                for i in reversed(range(ns)))
        self.dec_out = nn.Sequential(norm(widths[0]), nn.SiLU(), CausalConv3d(widths[0], 1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, T, H, W) -> mean, logvar of shape (B, z, 1 + (T-1)/td, H/sd, W/sd)."""
        h = self.conv_in(x)
        for block in self.down:
            h = block(h)
        mean, logvar = self.enc_out(h).chunk(2, dim=1)
        return mean, logvar.clamp(-20, 10)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.dec_in(z)
        for block in self.up:
            h = block(h)
        return self.dec_out(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, logvar = self.encode(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if self.training else mean
        recon = F.mse_loss(self.decode(z).float(), x.float())
        kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).mean()
        return recon + self.v.kl_weight * kl

    @torch.no_grad()
    def eval_metrics(self, batches) -> dict[str, float]:
        """val_loss (reconstruction MSE on [-1, 1] pixels) and PSNR on whole frames and on the digit's box."""
        mse, psnr, psnr_box, n = 0.0, 0.0, 0.0, 0
        for (x,) in batches:
            y = self.decode(self.encode(x)[0]).float().clamp(-1, 1)
            mse += F.mse_loss(y, x).item() * len(x)
            psnr += psnr_frames(y, x).sum().item()
            psnr_box += psnr_frames(y, x, box=True).sum().item()
            n += len(x)
        return {"val_loss": mse / n, "val_psnr": psnr / n, "val_psnr_box": psnr_box / n}


def psnr_frames(y: torch.Tensor, x: torch.Tensor, box: bool = False) -> torch.Tensor:
    """PSNR in dB per clip over [0, 1] pixels (inputs in [-1, 1]), from the MSE over all its frames.

    ``box``: only the pixels inside the digit's bounding box in each frame (where the real clip is lit), so a
    blurry digit cannot hide behind a black canvas.
    """
    a, b = (y + 1) / 2, (x + 1) / 2
    err = (a - b) ** 2
    if box:
        lit = b > 0.02
        rows, cols = lit.any(-1, keepdim=True), lit.any(-2, keepdim=True)

        def span(m):  # fill between the first and last lit row/column
            c = m.float().cumsum(-2 if m.shape[-1] == 1 else -1)
            return (c > 0) & (c < c.amax(dim=(-2 if m.shape[-1] == 1 else -1), keepdim=True)) | m

        mask = span(rows) & span(cols)
        mse = (err * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1)
    else:
        mse = err.flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


def load_vae_run(run_dir, cfg: ModelConfig) -> VideoVAE:
    """A trained video-vae run's latest weights in a frozen, eval-mode VAE (its shape checked against cfg)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from steplab.config import RunConfig

    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not (run_dir / "config.json").is_file():
        raise ConfigError(f"model.video.vae_run={str(run_dir)!r} is not a run directory; train a VAE first "
                          f"(steplab train --preset stepvideo-vae-nano --out DIR) and set vae_run=DIR")
    saved = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text())).model.video
    shape = ("frames", "size", "channels", "z_channels", "spatial_down", "temporal_down")
    diff = [f"{k} ({getattr(saved, k)} vs {getattr(cfg.video, k)})" for k in shape if getattr(saved, k) != getattr(cfg.video, k)]
    if diff:
        raise ConfigError(f"model.video.vae_run={run_dir} was trained with another VAE shape: {', '.join(diff)}; "
                          f"set the same model.video fields")
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "model.safetensors").is_file())
    if not ckpts:
        raise ConfigError(f"model.video.vae_run={run_dir} has no checkpoint; train the VAE first")
    with torch.random.fork_rng(devices=[]):
        vae = VideoVAE(cfg)
    vae.load_state_dict(load_file(str(ckpts[-1] / "model.safetensors")))
    return vae.eval().requires_grad_(False)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    with torch.random.fork_rng(devices=[]):  # building a model to count it must not move the run's RNG
        n = sum(p.numel() for p in VideoVAE(cfg).parameters())
    return {"N": n, "N_active": n, "embedding": 0, "total": n}


def measured_flops(model: nn.Module, *inputs: torch.Tensor) -> float:
    """Training FLOPs of one forward + backward (3x the counted forward) on these inputs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs)
    return 3.0 * counter.get_total_flops()


def flops_per_pixel(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Per pixel (the VAE's "token"): counted on one clip; 6N would miss that a conv weight is reused per position."""
    v = cfg.video
    with torch.random.fork_rng(devices=[]):
        model = measured_flops(VideoVAE(cfg).eval(), torch.zeros(1, 1, v.frames, v.size, v.size)) / (v.frames * v.size ** 2)
    return {"6N": 6.0 * count_params(cfg)["N"], "model": model}


def _register() -> None:
    from steplab.models import Family, register_family

    register_family("video-vae", lambda: Family("video-vae", VideoVAE, count_params, flops_per_pixel))


_register()
