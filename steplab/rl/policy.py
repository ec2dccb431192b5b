"""The policy and critic as the RL loop sees them: a critic built from the policy, rollouts packed into padded
batches, and the trainer-side recomputation of log-probabilities and values.

The critic is ORZ's: a copy of the policy network (same weights) whose vocabulary head is replaced by a scalar
value head (zero-initialised, so the first values are 0 and the first advantages are the rewards).

Packing: row b holds ``prompt_b + response_b`` right-padded; position t predicts token t + 1, so response token
j of row b (at position P_b + j) is scored by the logits and valued by the critic at position P_b + j - 1.
``mask`` marks those prediction positions; every per-token tensor here is (B, L - 1) on them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from steplab.eval.verifier import with_scalar_head


@dataclass
class Sample:
    """One sampled response to one prompt, with what the engine reported and what the grader said."""

    item: int  # index of the problem in the run's training pool (or the eval list)
    group: int  # which prompt of the rollout batch (the GRPO group)
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]  # the engine's log-probability of each sampled token
    finish_reason: str
    text: str
    reward: float = 0.0
    correct: bool = False
    well_formed: bool = False
    extra: dict = field(default_factory=dict)


def make_critic(policy: nn.Module) -> nn.Module:
    """A copy of the policy with a scalar value head in place of the vocabulary head."""
    return with_scalar_head(policy)


@dataclass
class Batch:
    ids: torch.Tensor  # (B, L) prompt + response, right-padded
    mask: torch.Tensor  # (B, L - 1) true where the position predicts a response token
    rewards: torch.Tensor  # (B,)
    groups: torch.Tensor  # (B,)


def pack(samples: list[Sample], pad_id: int, device="cpu") -> Batch:
    L = max(len(s.prompt) + len(s.tokens) for s in samples)
    ids = torch.full((len(samples), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), L - 1), dtype=torch.bool)
    for b, s in enumerate(samples):
        seq = s.prompt + s.tokens
        ids[b, :len(seq)] = torch.tensor(seq)
        mask[b, len(s.prompt) - 1:len(seq) - 1] = True
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    groups = torch.tensor([s.group for s in samples], dtype=torch.long)
    return Batch(ids.to(device), mask.to(device), rewards.to(device), groups.to(device))


def token_logprobs(policy: nn.Module, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, L - 1): log-probability of each next token under the policy (sampling temperature applied)."""
    logits = policy(ids)[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]


def token_values(critic: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(B, L - 1): the critic's value of the state before each next token."""
    return critic(ids)[:, :-1, 0].float()


def engine_logprobs(samples: list[Sample], L: int) -> torch.Tensor:
    """The engine's reported log-probabilities laid out like :func:`token_logprobs` (0 off the mask)."""
    out = torch.zeros((len(samples), L - 1))
    for b, s in enumerate(samples):
        out[b, len(s.prompt) - 1:len(s.prompt) - 1 + len(s.tokens)] = torch.tensor(s.logprobs)
    return out
