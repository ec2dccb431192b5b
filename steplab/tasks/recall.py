"""Two-turn recall (chat): facts stated in turn 1, one of them asked for in turn 2.

    user: Remember this: Tavo's color is green and Mira's color is blue.
    assistant: Noted: Tavo=green, Mira=blue.
    user: What is Mira's color?
    assistant: Mira=blue
               Answer: blue

The assistant's note in turn 1 writes each value right after its name, and the reply looks the asked name up
in it ("Mira=" then the token that followed "Mira=" before): a copy one induction head makes. With the facts
only as stated ("Mira's color is blue"), the tokens before each value ("'s color is") are the same for both
names, and a 2.3M-parameter chat model answered with either value (51% held-out after 3,000 SFT steps; 42%
when its reply restated "Mira's color is": docs/LOG.md).

Names are pseudo-words, both on the item's side of the split (the key is the asked name, hashed as the
spelling tasks hash words), so a held-out name appears in no training conversation.
"""
from __future__ import annotations

import random
from typing import Iterator

from steplab.tasks.base import Item, split_of_key
from steplab.tasks.chat import ChatTask, pseudo_word, word_on_side

ATTRIBUTES = {
    "color": ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "gray"],
    "number": [str(n) for n in range(10, 100)],
    "pet": ["cat", "dog", "fish", "bird", "horse", "rabbit", "turtle", "snake", "mouse", "frog"],
    "city": ["Paris", "Rome", "Cairo", "Lima", "Oslo", "Tokyo", "Delhi", "Berlin", "Madrid", "Sydney"],
    "fruit": ["apple", "pear", "plum", "grape", "mango", "lemon", "cherry", "peach", "melon", "kiwi"],
}
QUESTIONS = ["What is {n}'s {a}?", "Which {a} does {n} have?", "Tell me {n}'s {a}."]


class Recall(ChatTask):
    name = "recall"
    description = "two-turn recall: a fact stated in turn 1, asked in turn 2 (chat; held-out names)"
    chance = 0.08  # a uniform guess among the asked attribute's values (1/10 for four attributes, 1/90 for numbers)
    max_tokens = 32  # the reply looks the name up first: "Gumhul=mango\nAnswer: mango"

    def candidates(self, seed: int) -> Iterator[Item]:
        rng = random.Random(seed)
        while True:
            first = pseudo_word(rng, (2, 2)).capitalize()
            side = split_of_key(first.lower(), self.held_out)
            second = first
            while second == first:
                second = word_on_side(rng, side, self.held_out, (2, 2)).capitalize()
            attr = rng.choice(sorted(ATTRIBUTES))
            v1, v2 = rng.sample(ATTRIBUTES[attr], 2)
            facts = f"{first}'s {attr} is {v1} and {second}'s {attr} is {v2}"
            name, value = (first, v1) if rng.random() < 0.5 else (second, v2)
            question = rng.choice(QUESTIONS).format(n=name, a=attr)
            note = f"Noted: {first}={v1}, {second}={v2}."
            msgs = (("user", f"Remember this: {facts}."), ("assistant", note), ("user", question))
            yield Item(prompt=question, answer=value, key=first.lower(), messages=msgs,
                       reply=f"{name}={value}\nAnswer: {value}")
