"""Token sampling and KV-cached generation.

``generate`` decodes a batch of prompts of any lengths: each prompt is prefilled into its own cache slot,
then all rows decode together one token per step. Greedy decoding with the cache returns exactly what
recomputing the full prefix each step (``use_cache=False``) returns; a test holds us to that.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from steplab.models.common import KVCache


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k and outside the smallest set with mass >= top_p."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if params.temperature < torch.finfo(torch.float32).tiny:  # 0, or too small for float32 (5e-324 -> 0.0): greedy
        return logits.argmax(dim=-1)
    # shift by the row max before dividing: a tiny temperature then tends to greedy instead of overflowing to
    # inf - inf = NaN; softmax is unchanged by the shift
    logits = logits.float()
    logits = filter_logits((logits - logits.amax(dim=-1, keepdim=True)) / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams, *, stop_ids: set[int] | None = None,
             use_cache: bool = True) -> list[list[int]]:
    """Continue each prompt; returns only the new tokens of each (a stop token ends a row and is kept)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the bos token)")
    model.eval()
    device = next(model.parameters()).device
    max_len = max(len(p) for p in prompts) + params.max_new_tokens
    if max_len > model.cfg.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {max_len} tokens exceeds the model's context of {model.cfg.max_seq_len}")
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    stop_ids = stop_ids or set()
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)

    if use_cache:
        cache = KVCache(model.cfg, len(prompts), max_len, device=device, dtype=next(model.parameters()).dtype)
        last_logits = []
        for slot, prompt in enumerate(prompts):  # prefill each row at its own length
            ids = torch.tensor([prompt], device=device)
            last_logits.append(model(ids, cache=cache, slots=torch.tensor([slot], device=device))[0, -1])
        logits = torch.stack(last_logits)
    else:
        seqs = [list(p) for p in prompts]
        logits = torch.stack([model(torch.tensor([s], device=device))[0, -1] for s in seqs])

    for _ in range(params.max_new_tokens):
        next_ids = sample_next(logits, params, generator)
        for row, token in enumerate(next_ids.tolist()):
            if not done[row]:
                out[row].append(token)
                done[row] = token in stop_ids
        if all(done):
            break
        if use_cache:
            logits = model(next_ids[:, None], cache=cache)[:, -1]
        else:
            for row, s in enumerate(seqs):
                s.append(int(next_ids[row]))
            logits = torch.stack([model(torch.tensor([s], device=device))[0, -1] for s in seqs])
    return out
