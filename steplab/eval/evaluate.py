"""Validation loss and bits per byte.

Bits per byte divides the summed cross-entropy (in bits) by the UTF-8 bytes the target tokens stand for,
so it compares models with different tokenizers; special tokens stand for no bytes and are left out of
both sums (nanochat's convention).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 byte count of every token id; 0 for special tokens."""
    special = set(tokenizer.special_ids.values())
    lengths = [0 if i in special else len(tokenizer.decode([i]).encode("utf-8", errors="surrogatepass")) for i in range(tokenizer.vocab_size)]
    return torch.tensor(lengths, dtype=torch.long)


def autocast_context(device_type: str, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, token_bytes: torch.Tensor, *, device: str = "cpu", dtype: str = "fp32") -> dict[str, float]:
    """Mean loss over ``batches`` (an iterable of (x, y)) in nats/token, and bits per byte."""
    was_training = model.training
    model.eval()
    device_type = torch.device(device).type
    token_bytes = token_bytes.to(device)
    nats = nats_counted = 0.0
    n_tokens = n_bytes = 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast_context(device_type, dtype):
            logits = model(x)
        losses = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="none")
        nbytes = token_bytes[y.view(-1)]
        nats += losses.sum().item()
        n_tokens += y.numel()
        counted = nbytes > 0
        nats_counted += losses[counted].sum().item()
        n_bytes += int(nbytes.sum().item())
    model.train(was_training)
    if n_tokens == 0:
        raise ValueError("no validation batches: the validation split is smaller than one window")
    return {
        "val_loss": nats / n_tokens,
        "val_bpb": nats_counted / (math.log(2) * max(n_bytes, 1)),
        "val_tokens": n_tokens,
    }
