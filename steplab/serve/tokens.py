"""Token display strings and exact bytes for the logprobs fields.

A byte-level BPE piece is written in GPT-2's printable stand-in alphabet (``tokenizers``' ByteLevel alphabet):
bytes that are printable Latin-1 stand for themselves, the other 68 are shifted to U+0100.. in byte order.
"""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """The stand-in character -> the byte it stands for, derived from ``ByteLevel.alphabet()``."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = set(ByteLevel.alphabet())
    direct = {c: ord(c) for c in alphabet if ord(c) < 256}
    shifted = [b for b in range(256) if chr(b) not in direct]  # in byte order, mapped to U+0100, U+0101, ...
    decoder = {**direct, **{chr(256 + i): b for i, b in enumerate(shifted)}}
    assert len(decoder) == 256 and set(decoder) == alphabet, "unexpected ByteLevel alphabet"
    return decoder


def token_table(tokenizer) -> list[tuple[str, list[int]]]:
    """(display string, UTF-8 bytes) of every token id."""
    decoder, specials = byte_decoder(), set(tokenizer.special_ids.values())
    hf = getattr(tokenizer, "_tok", None)
    table = []
    for i in range(tokenizer.vocab_size):
        piece = hf.id_to_token(i) if hf is not None else None
        if piece is not None and i not in specials and all(ch in decoder for ch in piece):
            raw = bytes(decoder[ch] for ch in piece)
        else:
            raw = (piece if i in specials and piece else tokenizer.decode([i])).encode("utf-8")
        table.append((raw.decode("utf-8", errors="replace"), list(raw)))
    return table
