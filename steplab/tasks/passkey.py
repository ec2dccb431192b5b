"""Passkey retrieval (Mohtashami & Jaggi 2023; the YaRN paper's long-context probe).

A five-digit key is hidden at a chosen depth inside repetitive filler text and asked for at the end:

    <bos> filler ... The pass key: 71432. Remember it. Remember it. 71432 is the pass key. ... filler
    What is the pass key? The pass key: 71432

Everything is built in token space so one example is exactly ``length`` tokens whatever the tokenizer:
the filler, the key sentence and the question are tokenized once each and the filler is cut to fit. The
answer is the key's tokens after the question; grading is exact match of all of them. Greedy decoding
returns the answer exactly when the argmax at every answer position (teacher-forced) is the answer token,
so the grader scores a whole batch with one forward pass instead of decoding token by token.

Splits: a key belongs to ``test`` when a hash of it falls in the last 10% of buckets, else to ``train``;
training documents (``documents``) use train keys only and evaluation uses test keys, so a model cannot
score by memorising keys. Chance level (guessing a uniform five-digit key) is 1e-5.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
# "pass key:" ends both the key sentence and the question, so the token before the key is unique in the text
# (the filler's many " is" would otherwise compete), as in the "key: value" layout of associative-recall probes.
# The key is repeated after 0-3 "Remember it." (chosen by the key): a varying gap, so the repeat can only be
# predicted by content (an induction head, which the answer needs) and not by a fixed position offset.
KEY_SENTENCE = " The pass key: {key}.{gap} {key} is the pass key. "
GAP = " Remember it."
QUESTION = " What is the pass key? The pass key:"
KEY_DIGITS = 5
CHANCE = 1.0 / 10**KEY_DIGITS


def split_of_key(key: int) -> str:
    bucket = int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:4], "little") % 10
    return "test" if bucket == 9 else "train"


def draw_key(rng: np.random.Generator, split: str) -> int:
    while True:
        key = int(rng.integers(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS))
        if split_of_key(key) == split:
            return key


@dataclass
class Example:
    tokens: list[int]  # prompt + answer, exactly the requested length
    answer_len: int  # the last ``answer_len`` tokens are the answer
    key: int
    depth: float


class Passkey:
    """Generator of passkey examples for one tokenizer."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.filler = tokenizer.encode(FILLER * 8)
        self.question = tokenizer.encode(QUESTION)

    def min_length(self) -> int:
        key = self.tok.encode(KEY_SENTENCE.format(key=10**KEY_DIGITS - 1, gap=GAP * 3))
        return 1 + len(key) + len(self.question) + len(self.tok.encode(" 99999")) + 8

    def example(self, length: int, depth: float, key: int) -> Example:
        """``length`` tokens with the key sentence starting ``depth`` (0..1) of the way into the filler."""
        if length < self.min_length():
            raise ValueError(f"passkey length {length} is too short; the smallest is {self.min_length()} tokens")
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"passkey depth {depth} is outside 0..1")
        key_ids = self.tok.encode(KEY_SENTENCE.format(key=key, gap=GAP * (key % 4)))
        answer = self.tok.encode(f" {key}")
        n_filler = length - 1 - len(key_ids) - len(self.question) - len(answer)
        filler = (self.filler * (n_filler // len(self.filler) + 1))[:n_filler]
        at = int(round(depth * n_filler))
        tokens = [self.tok.bos_id] + filler[:at] + key_ids + filler[at:] + self.question + answer
        return Example(tokens, len(answer), key, depth)

    def documents(self, n: int, length: int, seed: int) -> list[list[int]]:
        """``n`` training documents of exactly ``length`` tokens (train keys, uniform depths)."""
        rng = np.random.default_rng([seed, length])
        return [self.example(length, float(rng.random()), draw_key(rng, "train")).tokens for _ in range(n)]

    def packed_rows(self, n: int, length: int, min_doc: int, seed: int) -> list[list[int]]:
        """``n`` rows of exactly ``length`` tokens, each packed with passkey documents of lengths drawn uniformly
        from [``min_doc``, ``length``] (the last one sized to fill the row; train keys, uniform depths). Under
        the document mask every key-to-question distance up to ``length`` is trained, the short ones included,
        which rows of one document each cover only in proportion to their share of the row."""
        min_doc = max(min_doc, self.min_length())
        if min_doc > length:
            raise ValueError(f"passkey documents of at least {min_doc} tokens do not fit rows of {length}")
        rng = np.random.default_rng([seed, length, min_doc])
        rows = []
        for _ in range(n):
            row, left = [], length
            while left:
                size = left if left < 2 * min_doc else int(rng.integers(min_doc, left + 1))
                if left - size < min_doc:  # a remainder too short for a document joins this one
                    size = left
                row += self.example(size, float(rng.random()), draw_key(rng, "train")).tokens
                left -= size
            rows.append(row)
        return rows

    def eval_examples(self, n: int, length: int, depth: float, seed: int = 0) -> list[Example]:
        rng = np.random.default_rng([seed, length, int(depth * 1000)])
        return [self.example(length, depth, draw_key(rng, "test")) for _ in range(n)]


@torch.no_grad()
def grade(model, examples: list[Example], *, batch_size: int = 8, device="cpu") -> list[bool]:
    """Exact match per example: every answer token is the model's argmax given the tokens before it."""
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        x = torch.tensor([e.tokens[:-1] for e in chunk], device=device)
        logits = model(x)
        for row, e in enumerate(chunk):
            target = torch.tensor(e.tokens[-e.answer_len:], device=device)
            pred = logits[row, -e.answer_len:].argmax(-1)
            out.append(bool((pred == target).all()))
    return out
