"""Validation loss and bits per byte.

Bits per byte divides the summed cross-entropy (in bits) by the UTF-8 bytes the target tokens stand for,
so it compares models with different tokenizers; special tokens stand for no bytes and are left out of
both sums (nanochat's convention).
"""
from __future__ import annotations

import contextlib
import json
import math

import torch
import torch.nn.functional as F

from steplab.data.chat import IGNORE_INDEX


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character that stands for each byte -> that byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for; 0 for special tokens.

    A byte-level BPE token is a string over GPT-2's 256-character alphabet, one character per byte, so its
    length in bytes is its length in characters. Decoding a token alone is wrong for any token holding part
    of a multi-byte character (it decodes to U+FFFD, 3 bytes): accented and CJK text got the wrong count.
    Added tokens (not byte-level) count their UTF-8 content; other decoders (SentencePiece-style byte
    fallback ``<0xNN>`` and ``▁`` for a space) are counted the same way, token by token.
    """
    hf = tokenizer._tok  # the wrapped ``tokenizers.Tokenizer``
    special = set(tokenizer.special_ids.values())
    added = {i: t.content for i, t in hf.get_added_tokens_decoder().items()}
    decoder = (json.loads(hf.to_str()).get("decoder") or {}).get("type")
    byte_of = _byte_level_decoder()
    lengths = []
    for i in range(tokenizer.vocab_size):
        piece = hf.id_to_token(i)
        if i in special or piece is None:
            lengths.append(0)
        elif i in added:
            lengths.append(len(added[i].encode("utf-8")))
        elif decoder == "ByteLevel":
            lengths.append(sum(1 if c in byte_of else len(c.encode("utf-8")) for c in piece))
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            lengths.append(1)
        else:
            lengths.append(len(piece.replace("\u2581", " ").encode("utf-8")))
    return torch.tensor(lengths, dtype=torch.long)


def autocast_context(device_type: str, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, token_bytes: torch.Tensor, *, device: str = "cpu", dtype: str = "fp32") -> dict[str, float]:
    """Mean loss over ``batches`` (an iterable of (x, y)) in nats/token, and bits per byte; targets equal to
    IGNORE_INDEX (a chat batch's prompts and padding) are left out of both."""
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
        flat = y.reshape(-1)
        valid = flat != IGNORE_INDEX  # chat batches: only assistant tokens are targets
        losses = F.cross_entropy(logits.float().view(-1, logits.size(-1)), flat, reduction="none", ignore_index=IGNORE_INDEX)
        nbytes = token_bytes[flat.clamp(min=0)] * valid
        nats += losses.sum().item()
        n_tokens += int(valid.sum().item())
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
