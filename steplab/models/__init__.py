"""Model families and the one small interface the trainer, the scaling-law tools and parallelism use.

A family (Step-1 dense, Step-2 MoE; vision, audio and video next) registers a :class:`Family`: how to build
its module from the config and how to count its parameters (N total, N_active per token). Everything else
the machinery needs is derived here (FLOPs per token) or asked of the module through :class:`Trainable`, so
the trainer and ``train/distributed.py`` never look inside a family.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from steplab.config import ModelConfig
from steplab.errors import ConfigError


class Trainable(Protocol):
    """What a model module offers the trainer (``torch.nn.Module`` subclasses; Step1 has the defaults).

    ``forward(*batch)`` returns the training loss for one batch of the run's data (text: ``(idx, targets)``;
    see train/data.py): called through the DDP/FSDP wrapper, so gradient
    synchronisation sees it. ``step_stats()`` lists the tensors a family accumulates over an optimizer step's
    micro-batches (MoE: tokens per expert); data parallelism sums them over ranks before
    ``after_optimizer_step()`` uses them (and returns scalars to log). ``discard_step_stats()`` forgets them
    when a step is skipped.
    """

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor: ...
    def step_stats(self) -> list[torch.Tensor]: ...
    def after_optimizer_step(self) -> dict[str, float]: ...
    def discard_step_stats(self) -> None: ...


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[ModelConfig], torch.nn.Module]
    count_params: Callable[[ModelConfig], dict[str, int]]  # N, N_active, embedding, total
    # Training FLOPs per token (cfg, seq_len) -> {"6N", "model"}; None: the decoder formula below.
    flops_per_token: Callable[[ModelConfig, int], dict[str, float]] | None = None


# Families other than Step-1/Step-2, by ``model.family``: the module that calls register_family, imported only
# when a config names it (a text run never imports the vision or video code).
FAMILY_MODULES: dict[str, str] = {"step1v": "steplab.models.vision", "video-vae": "steplab.models.video", "video-dit": "steplab.models.dit"}

_FAMILIES: dict[str, Callable[[], Family]] = {}


def register_family(name: str, factory: Callable[[], Family]) -> None:
    _FAMILIES[name] = factory


def family(cfg: ModelConfig) -> Family:
    if cfg.family in ("", "step1", "step2"):
        if cfg.moe.n_experts > 0:
            from steplab.models import moe

            return Family("step2-moe", moe.Step2, moe.count_params)
        from steplab.models import dense

        return Family("step1-dense", dense.Step1, dense.count_params)
    if cfg.family not in _FAMILIES and cfg.family in FAMILY_MODULES:
        importlib.import_module(FAMILY_MODULES[cfg.family])
    if cfg.family not in _FAMILIES:
        known = ", ".join(sorted({"step1", "step2", *_FAMILIES, *FAMILY_MODULES}))
        raise ConfigError(f"model.family={cfg.family!r} is not a known model family; known: {known}")
    return _FAMILIES[cfg.family]()


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    return family(cfg).build(cfg)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """N (total non-embedding), N_active (per token), embedding, total."""
    return family(cfg).count_params(cfg)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token, two ways, for every family.

    ``6N`` is the scaling-law convention (C = 6 N D, with N_active for MoE: C = 6 N_a D). ``model`` is what the
    hardware really does and is the numerator of MFU: 6 x (N_active + the lm_head matmul) plus attention
    scores and values, 12 * n_layer * d * T (PaLM's appendix B, counting the full T x T product as computed).
    """
    own = family(cfg).flops_per_token
    if own is not None:
        return own(cfg, seq_len)
    n_active = count_params(cfg)["N_active"]
    model = 6 * (n_active + cfg.d_model * cfg.vocab_size) + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
    return {"6N": 6.0 * n_active, "model": float(model)}
