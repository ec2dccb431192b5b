"""Model zoo entry points: ``build_model`` picks Step-1 (dense) or Step-2 (MoE) from the config."""
from __future__ import annotations

import torch

from steplab.config import ModelConfig


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    if cfg.moe.n_experts > 0:
        from steplab.models.moe import Step2

        return Step2(cfg)
    from steplab.models.dense import Step1

    return Step1(cfg)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """N (total non-embedding), N_active (per token), embedding, total."""
    if cfg.moe.n_experts > 0:
        from steplab.models.moe import count_params as count

        return count(cfg)
    from steplab.models.dense import count_params as count

    return count(cfg)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """``6N`` (with N_active for MoE) and ``model`` (what the hardware does, for MFU)."""
    if cfg.moe.n_experts > 0:
        from steplab.models.moe import flops_per_token as flops

        return flops(cfg, seq_len)
    from steplab.models.dense import flops_per_token as flops

    return flops(cfg, seq_len)
