"""AdamW with the usual weight-decay split, and the learning-rate schedules (warmup + cosine, WSD, constant)."""
from __future__ import annotations

import math

import torch

from steplab.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """Decay matrices and embeddings; never norms (1-D weights), whose scale decay would only fight.

    A model may scale the learning rate of some parameters: ``model.lr_multipliers()`` maps parameter-name
    prefixes to multipliers (Step-1V's projector learns faster than the backbones, as in nanoVLM). Each
    (weight decay, multiplier) pair is one param group with an ``lr_mult`` key; the trainer sets every group's
    lr to the schedule's lr times it. Frozen parameters (requires_grad False) are left out.
    The fused kernel (one pass over all parameters) exists for CUDA and, since torch 2.4, for CPU.
    """
    mults = model.lr_multipliers() if hasattr(model, "lr_multipliers") else {}
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {(cfg.weight_decay, 1.0): [], (0.0, 1.0): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            mult = next((m for prefix, m in mults.items() if name.startswith(prefix)), 1.0)
            groups.setdefault((cfg.weight_decay if p.dim() >= 2 else 0.0, mult), []).append(p)
    param_groups = [{"params": ps, "weight_decay": wd, "lr_mult": mult} for (wd, mult), ps in groups.items()]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=device_type in ("cuda", "cpu"))


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
