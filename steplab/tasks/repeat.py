"""Repeat (chat): copy a sequence of made-up words exactly, "Repeat exactly: tavo brisgo lunem" -> ``Answer: tavo
brisgo lunem``.

Copying a sequence seen earlier is what an induction head does (find where the current token occurred before,
emit the token that followed it), and recall needs exactly that: look a name up in the turn-1 note and copy what
followed it. The briefly pretrained base models here have no induction at all (the loss on the second copy of a
repeated random sequence equals the first's, docs/LOG.md), so this task teaches the mechanism directly. All words
of an item lie on its split's side (keyed by the first word, hashed as the spelling and recall tasks hash theirs),
so a held-out sequence has no word seen in training.
"""
from __future__ import annotations

import random
from typing import Iterator

from steplab.tasks.base import Item, split_of_key
from steplab.tasks.chat import ChatTask, final_answer, pseudo_word, word_on_side

PROMPTS = ["Repeat exactly: {s}", "Say this back to me: {s}", "Copy these words: {s}", "Echo: {s}"]


class Repeat(ChatTask):
    name = "repeat"
    description = "copy a sequence of 3-8 made-up words exactly (chat; held-out words)"
    max_tokens = 48

    def candidates(self, seed: int) -> Iterator[Item]:
        rng = random.Random(seed)
        while True:
            first = pseudo_word(rng, (1, 2))
            side = split_of_key(first, self.held_out)
            words = [first] + [word_on_side(rng, side, self.held_out, (1, 2)) for _ in range(rng.randint(2, 7))]
            seq = " ".join(words)
            prompt = rng.choice(PROMPTS).format(s=seq)
            yield Item(prompt=prompt, answer=seq, key=first, messages=(("user", prompt),), reply=f"Answer: {seq}")

    def grade(self, item: Item, output: str) -> bool:
        return final_answer(output) == item.answer
