"""What every task is: a seeded generator of items with train and held-out splits, a grader, a chance level.

A task yields candidate :class:`Item` s; :meth:`Task.items` splits them by a hash of ``item.key`` (default the
prompt), so a prompt can only ever land on one side, and de-duplicates prompts within a split. Tasks built from
documents (the stdlib tasks) set ``key`` to the source document and split with the same hash and fraction
as ``steplab data prepare`` (``steplab.data.sources.split_of``, 5%, seed 0): their held-out items come from
documents a model trained on that corpus never saw; their train split also drops any prompt that occurs in
the held-out split.

Two kinds:
- ``choice``: the model scores each of ``item.choices`` as a continuation of ``item.prompt``; the item is right
  when the correct choice (``item.label``) scores highest (per byte by default, lm-evaluation-harness's
  ``acc_norm``; ``score_by = "sum"`` for the raw sum, its ``acc``);
- ``generate``: greedy generation from ``item.prompt`` until a stop string, graded by :meth:`Task.grade`;
- ``chat``: a conversation (``item.messages``, under the one chat template ``steplab.data.chat``) answered greedily
  until ``<|end|>``, graded by :meth:`Task.grade`; ``item.reply`` is a reference reply (SFT's target). See
  ``steplab.tasks.chat``.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Iterator

from steplab.data.sources import split_of

HELD_OUT_FRACTION = 0.05  # = steplab data prepare's default val fraction, so document splits agree
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Item:
    prompt: str
    answer: str  # reference answer (generate) or the correct choice's text (choice)
    choices: tuple[str, ...] = ()
    label: int = -1  # index of the correct choice
    key: str = ""  # what decides the split (default: the prompt)
    messages: tuple[tuple[str, str], ...] = ()  # chat: (role, content) turns up to the question (the last is the user's)
    reply: str = ""  # chat: a reference assistant reply (worked steps, then the answer line)


class Task:
    name: str = ""
    kind: str = "choice"  # choice | generate | chat
    chance: float = 0.0  # expected accuracy of a guesser (choice: 1 / number of choices)
    description: str = ""
    score_by: str = "byte"  # choice tasks: "byte" (mean logprob per byte of the choice) or "sum"
    max_tokens: int = 32  # generate tasks
    stop: tuple[str, ...] = ("\n",)
    finite: bool = False  # True: candidates() is a finite pool (all of it is read); False: an endless generator
    held_out: float = HELD_OUT_FRACTION  # share of split keys that are held out

    def unavailable(self) -> str | None:
        """Why the task cannot run here (a data set is missing), or None."""
        return None

    def candidates(self, seed: int) -> Iterator[Item]:
        raise NotImplementedError

    def grade(self, item: Item, output: str) -> bool:
        """Generate tasks: exact match after stripping whitespace (override for looser answers)."""
        return output.strip() == item.answer.strip()

    def split_of(self, item: Item) -> str:
        return split_of_key(item.key or item.prompt, self.held_out)

    def items(self, split: str = "test", n: int | None = None, seed: int = 0) -> list[Item]:
        """Up to ``n`` distinct items of ``split`` (all of a finite pool when n is None), in a seeded order."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r} must be one of {SPLITS}")
        reason = self.unavailable()
        if reason:
            raise ValueError(f"task {self.name!r} is unavailable here: {reason}")
        if n is not None and n < 1:
            raise ValueError(f"n={n} must be >= 1")
        if not self.finite and n is None:
            raise ValueError(f"task {self.name!r} is an endless generator: pass n")
        held_out = set()
        if split == "train" and self.finite:
            held_out = {it.prompt for it in self.candidates(seed) if self.split_of(it) == "test"}
        out, seen = [], set()
        for it in self.candidates(seed):
            if self.split_of(it) != split or it.prompt in seen or it.prompt in held_out:
                continue
            seen.add(it.prompt)
            out.append(it)
            if not self.finite and len(out) >= n:
                break
        if self.finite:
            random.Random(f"{self.name}:{split}:{seed}").shuffle(out)
            out = out[:n]
        return out


@functools.lru_cache(maxsize=1 << 16)
def split_of_key(key: str, fraction: float = HELD_OUT_FRACTION) -> str:
    """"test" for the held-out share of keys, else "train" (cached: document keys are hashed once)."""
    return "test" if split_of(key, fraction) == "val" else "train"


def pick_distractors(rng: random.Random, pool: list[str], answer: str, k: int) -> list[str] | None:
    """k distinct strings from ``pool`` that differ from ``answer`` (None when the pool has too few)."""
    out: list[str] = []
    for _ in range(50 * k):
        if len(out) == k:
            break
        s = pool[rng.randrange(len(pool))]
        if s != answer and s not in out:
            out.append(s)
    return out if len(out) == k else None


def choice_item(rng: random.Random, prompt: str, answer: str, distractors: list[str], key: str) -> Item:
    """An item with the answer at a seeded random position among the distractors."""
    label = rng.randrange(len(distractors) + 1)
    choices = distractors[:label] + [answer] + distractors[label:]
    return Item(prompt=prompt, answer=answer, choices=tuple(choices), label=label, key=key)
