"""The RL algorithms as pure functions on tensors: advantages, the clipped policy and value losses.

Shapes: a rollout batch is B sequences; token tensors are (B, T) over the *response* positions, with ``mask``
(B, T) true on real response tokens. Rewards are per sequence (B,), given on the last response token.

- ``ppo`` (Open-Reasoner-Zero): a critic V_t per response token; GAE with gamma = lambda = 1, which reduces to
  A_t = R - V_t (the reward-to-go minus the value, the reward being on the last token); advantages whitened over
  the batch's response tokens; clipped surrogate (0.2) for the policy, clipped value loss (0.2) for the critic;
  no KL; loss averaged over all response tokens of the batch.
- ``grpo``: A = (r - mean_group) / (std_group + eps); loss averaged over each sequence's tokens, then over
  sequences (the length normalisation Dr. GRPO removes).
- ``dr-grpo``: A = r - mean_group; loss summed over tokens and divided by a constant (the generation budget
  ``max_tokens``) and by the number of sequences: no length or std normalisation.
- ``rloo``: A_i = r_i - mean_{j != i} r_j (leave-one-out baseline); token mean over the batch.
- ``reinforce``: A = r - mean_group (nanochat's mean baseline); token mean over the batch.

Every algorithm uses the same clipped surrogate: with one policy update per batch the ratio is 1 and it is the
plain policy gradient; with several mini-batches it is PPO's trust region.
"""
from __future__ import annotations

import torch

ALGOS = ("ppo", "grpo", "dr-grpo", "rloo", "reinforce")
AGGREGATION = {"ppo": "token-mean", "grpo": "seq-mean", "dr-grpo": "token-sum", "rloo": "token-mean",
               "reinforce": "token-mean"}


def token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) rewards: each sequence's reward on its last response token, 0 elsewhere."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    T = mask.shape[1]
    last = T - 1 - mask.long().flip(1).argmax(1)  # index of each row's last response token (rows start anywhere)
    has = mask.any(1)
    out[has.nonzero()[:, 0], last[has]] = rewards[has].float()
    return out


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens: (advantages, returns), both (B, T).

    ``rewards`` (B, T) per token, ``values`` (B, T) = V(s_t) before token t. Past a sequence's end the value is 0.
    With gamma = lambda = 1 the advantage is the reward-to-go minus the value.
    """
    B, T = values.shape
    values = values * mask
    adv = torch.zeros_like(values)
    running = torch.zeros(B, dtype=values.dtype, device=values.device)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        running = running * mask[:, t]
        adv[:, t] = running
    return adv, adv + values


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    m = mask.float()
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = ((x - mean) ** 2 * m).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * m


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, algo: str, eps: float = 1e-6) -> torch.Tensor:
    """Per-sequence advantages (B,) for the GRPO family; ``groups`` (B,) names each sequence's prompt."""
    r = rewards.float()
    out = torch.zeros_like(r)
    for g in groups.unique():
        idx = (groups == g).nonzero()[:, 0]
        rg = r[idx]
        n = rg.numel()
        if algo == "grpo":
            std = rg.std(unbiased=True) if n > 1 else torch.zeros(())
            out[idx] = (rg - rg.mean()) / (std + eps)
        elif algo in ("dr-grpo", "reinforce"):
            out[idx] = rg - rg.mean()
        elif algo == "rloo":
            out[idx] = rg - (rg.sum() - rg) / (n - 1) if n > 1 else torch.zeros_like(rg)
        else:
            raise ValueError(f"algo {algo!r} has no group advantage; use one of {ALGOS[1:]}")
    return out


def aggregate(loss: torch.Tensor, mask: torch.Tensor, how: str, max_tokens: int = 1) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar: token-mean, seq-mean (mean per sequence, then over sequences)
    or token-sum (sum / (B * max_tokens), Dr. GRPO's constant normaliser)."""
    m = mask.float()
    if how == "token-mean":
        return (loss * m).sum() / m.sum().clamp(min=1)
    if how == "seq-mean":
        return ((loss * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    if how == "token-sum":
        return (loss * m).sum() / (loss.shape[0] * max_tokens)
    raise ValueError(f"unknown aggregation {how!r}")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, clip: float,
                how: str = "token-mean", max_tokens: int = 1) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate -min(rho A, clip(rho, 1-e, 1+e) A), aggregated; with the clipped fraction."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * adv
    loss = -torch.minimum(unclipped, clipped)
    m = mask.float()
    frac = (((clipped < unclipped).float() * m).sum() / m.sum().clamp(min=1)).item()
    return aggregate(loss, mask, how, max_tokens), {"clip_frac": frac}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    """Clipped value loss 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -e, e) - R)^2), token mean."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    return aggregate(loss, mask, "token-mean")
