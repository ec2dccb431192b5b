"""Spelling and letter counting of made-up words (chat tasks).

Spelling: "Spell the word 'bakito'." -> ``Answer: b-a-k-i-t-o``. Letter counting spells the word, then checks
it letter by letter against the asked letter with a running count, then answers::

    b-a-k-a-t-a
    b!=a 0
    a=a 1
    k!=a 1
    ...
    Answer: 3

Each step writes the letter beside the asked one, so deciding ``=`` or ``!=`` needs only the two tokens before it
(a tiny model cannot look the asked letter up in the prompt at every step: with the earlier ``b 0, a 1, ...``
steps a 2.3M-parameter chat model spelled the words right and still never counted, docs/LOG.md).

Words are pseudo-words (``steplab.tasks.chat.pseudo_word``); the split key is the word, so a held-out word is
spelled or counted in no training conversation (recall's names split by the same hash).
"""
from __future__ import annotations

import random
import re
from typing import Iterator

from steplab.tasks.base import Item
from steplab.tasks.chat import ChatTask, answer_int, final_answer, pseudo_word

SPELL_PROMPTS = ["Spell the word '{w}'.", "How do you spell '{w}'?", "Spell '{w}' letter by letter.",
                 "What are the letters of '{w}'?"]
COUNT_PROMPTS = ["How many times does the letter '{c}' appear in '{w}'?", "Count the letter '{c}' in '{w}'.",
                 "How many '{c}' are in the word '{w}'?"]


def spelled(word: str) -> str:
    return "-".join(word)


class Spelling(ChatTask):
    name = "spelling"
    description = "spell a made-up word letter by letter (chat; held-out words)"
    max_tokens = 32

    def candidates(self, seed: int) -> Iterator[Item]:
        rng = random.Random(seed)
        while True:
            w = pseudo_word(rng)
            prompt = rng.choice(SPELL_PROMPTS).format(w=w)
            yield Item(prompt=prompt, answer=spelled(w), key=w, messages=(("user", prompt),),
                       reply=f"Answer: {spelled(w)}")

    def grade(self, item: Item, output: str) -> bool:
        ans = final_answer(output)
        return ans is not None and re.sub(r"[^a-z]", "", ans.lower()) == item.key


def count_steps(word: str, letter: str) -> str:
    n, steps = 0, []
    for c in word:
        n += c == letter
        steps.append(f"{c}{'=' if c == letter else '!='}{letter} {n}")
    return "\n".join([spelled(word), *steps, f"Answer: {n}"])


class LetterCount(ChatTask):
    name = "letter_count"
    description = "count a letter in a made-up word, letter by letter (chat; held-out words)"
    chance = 0.55  # always answering "1" (the most common count: 56% of 1,000 test items)
    max_tokens = 112  # the longest worked reply is ~90 tokens with a 4k code BPE

    def candidates(self, seed: int) -> Iterator[Item]:
        rng = random.Random(seed)
        while True:
            w = pseudo_word(rng)
            # mostly letters of the word (counts 1-3), sometimes one it lacks (count 0)
            c = rng.choice(w) if rng.random() < 0.8 else rng.choice([x for x in "abdegiklmnoprstuvz" if x not in w] or ["q"])
            prompt = rng.choice(COUNT_PROMPTS).format(c=c, w=w)
            yield Item(prompt=prompt, answer=str(w.count(c)), key=w, messages=(("user", prompt),),
                       reply=count_steps(w, c))

    def grade(self, item: Item, output: str) -> bool:
        return answer_int(output) == int(item.answer)
