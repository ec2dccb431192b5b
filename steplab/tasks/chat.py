"""Chat tasks: conversations with a verifiable answer, for SFT data, ``steplab eval --task`` and RL rewards.

Every reference reply ends with one line ``Answer: X`` (worked steps may come before it); :func:`final_answer`
reads that line back robustly (markdown bold, a trailing period, "the answer is X" when the line is missing), and
each task's :meth:`ChatTask.grade` compares what it read with ``item.answer``. Held-out splits follow the task
module's rule (a hash of ``item.key``): a key that is held out (a number pair, a word, a name) appears in no
training conversation of any chat task, since all of them split the same keys the same way.
"""
from __future__ import annotations

import random
import re
from typing import Iterator

from steplab.tasks.base import Item, Task, split_of_key

ANSWER_LINE = re.compile(r"(?:^|\n)[ \t*_#>-]*(?:final\s+)?answer\s*(?:is)?\s*[:=]?[ \t*_]*(.*)", re.IGNORECASE)
ANSWER_PHRASE = re.compile(r"\bthe answer is[:\s]+(.+)", re.IGNORECASE)
NUMBER = re.compile(r"[-\u2212]?\d[\d,]*")


def final_answer(text: str) -> str | None:
    """The answer a reply gives: the text after its last ``Answer:`` line marker (then "the answer is ...");
    markdown emphasis, surrounding quotes/backticks and a trailing period are removed. None when there is none."""
    found = ANSWER_LINE.findall(text) or ANSWER_PHRASE.findall(text)
    if not found:
        return None
    ans = found[-1].split("\n")[0].strip().strip("*_`'\" ").rstrip(".!").strip("*_`'\" ")
    return ans or None


def parse_int(text: str | None) -> int | None:
    """The integer an answer states ("1,234", "-38", "= 132", "\u221238"); None when it states none or several."""
    if text is None:
        return None
    nums = NUMBER.findall(text)
    if len(nums) != 1:
        return None
    try:
        return int(nums[0].replace(",", "").replace("\u2212", "-"))
    except ValueError:
        return None


def answer_int(reply: str) -> int | None:
    """The final integer of a reply: its answer line's number, else the last number of its last line."""
    ans = final_answer(reply)
    if ans is not None:
        return parse_int(ans)
    lines = [ln for ln in reply.strip().split("\n") if ln.strip()]
    nums = NUMBER.findall(lines[-1]) if lines else []
    return parse_int(nums[-1]) if nums else None


class ChatTask(Task):
    """A task whose items are conversations (``item.messages`` ending in a user turn) with a reference reply."""

    kind = "chat"
    chance = 0.0
    max_tokens = 96
    stop = ()

    def conversation(self, item: Item) -> list[dict[str, str]]:
        """The item as a training conversation: its turns plus the reference reply."""
        return messages_of(item) + [{"role": "assistant", "content": item.reply}]

    def grade(self, item: Item, output: str) -> bool:
        """Default: the answer line equals ``item.answer`` (case and surrounding whitespace ignored)."""
        ans = final_answer(output)
        return ans is not None and ans.lower() == (final_answer("Answer: " + item.answer) or "").lower()


def messages_of(item: Item) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in item.messages]


# ---- pseudo-words: the spelling, letter-counting and recall tasks' vocabulary ----------------------------

ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr", "st", "pl", "gr"]
VOWELS = ["a", "e", "i", "o", "u"]
CODAS = ["", "", "", "n", "r", "s", "l", "m"]


def pseudo_word(rng: random.Random, syllables: tuple[int, int] = (2, 3)) -> str:
    """A pronounceable made-up word ("bakito", "strelun"): no model has it memorised, so spelling and counting it
    is letter-level work, and a held-out word is new to the model."""
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                   for _ in range(rng.randint(*syllables)))


def word_on_side(rng: random.Random, side: str, held_out: float, syllables=(2, 3)) -> str:
    """A pseudo-word whose split (a hash of the word itself) is ``side``."""
    while True:
        w = pseudo_word(rng, syllables)
        if split_of_key(w, held_out) == side:
            return w


def endless(seed: int, make) -> Iterator[Item]:
    """Items from ``make(rng)`` forever (an endless generator task's ``candidates``)."""
    rng = random.Random(seed)
    while True:
        yield make(rng)
