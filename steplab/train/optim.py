"""AdamW with the usual weight-decay split, and the learning-rate schedules (warmup + cosine, WSD, constant)."""
from __future__ import annotations

import math

import torch

from steplab.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """Decay matrices and embeddings; never norms (1-D weights), whose scale decay would only fight.

    The fused kernel (one pass over all parameters) exists for CUDA and, since torch 2.4, for CPU.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=device_type in ("cuda", "cpu"))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the chosen shape to min_lr."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    total = max(cfg.max_steps - 1, 1)
    if cfg.schedule == "cosine":
        progress = min((step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1), 1.0)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: warmup, stable at peak, then a linear decay over the last decay_fraction of training.
    decay_start = int(cfg.max_steps * (1 - cfg.decay_fraction))
    if step < decay_start:
        return peak
    progress = min((step - decay_start) / max(total - decay_start, 1), 1.0)
    return peak + (floor - peak) * progress
