"""Which is the real line? A held-out line of standard-library code and the same line with two of its words
swapped, after the code before it (a minimal pair, as BLiMP does for grammar); chance 50%. The two choices have
the same bytes, so the score compares word order alone."""
from __future__ import annotations

import random
from typing import Iterator

from steplab.tasks.base import Item, Task, choice_item
from steplab.tasks.code import context_before, stdlib_documents

PER_DOCUMENT = 20


def swap_two_words(line: str, rng: random.Random) -> str | None:
    indent = line[:len(line) - len(line.lstrip())]
    words = line.strip().split(" ")
    pairs = [(i, j) for i in range(len(words)) for j in range(i + 1, len(words))
             if words[i] and words[j] and words[i] != words[j]]  # "" is a run of spaces: leave the layout alone
    if len(words) < 4 or not pairs:
        return None
    i, j = pairs[rng.randrange(len(pairs))]
    words[i], words[j] = words[j], words[i]
    return indent + " ".join(words)


class LineOrder(Task):
    name = "line_order"
    kind = "choice"
    chance = 0.5
    finite = True
    description = "real stdlib line vs the same line with two words swapped (held-out files)"

    def candidates(self, seed: int) -> Iterator[Item]:
        for doc in stdlib_documents():
            lines = doc.split("\n")
            ok = [i for i in range(8, len(lines)) if 12 <= len(lines[i].strip()) <= 80
                  and not lines[i].lstrip().startswith("#") and lines[i].strip().count(" ") >= 3]
            rng = random.Random(f"{seed}:{doc[:200]}")
            for i in sorted(rng.sample(ok, min(PER_DOCUMENT, len(ok)))):
                context = context_before(lines, i)
                wrong = swap_two_words(lines[i], rng)
                if wrong is None or wrong == lines[i] or context.count("\n") < 4:
                    continue
                yield choice_item(rng, context, lines[i] + "\n", [wrong + "\n"], key=doc)
