"""Complete a held-out line of code: greedy generation of the next line of a standard-library file from the
lines before it, graded by exact match (whitespace-stripped). A guesser scores ~0, so chance is 0."""
from __future__ import annotations

import random
from typing import Iterator

from steplab.tasks.base import Item, Task
from steplab.tasks.code import context_before, stdlib_documents

PER_DOCUMENT = 12  # lines drawn per document (the pool stays small; the draw is seeded by the document)


class CompleteLine(Task):
    name = "complete_line"
    kind = "generate"
    chance = 0.0
    finite = True
    max_tokens = 32
    stop = ("\n",)
    description = "greedy-complete the next line of a stdlib file, exact match (held-out files)"

    def candidates(self, seed: int) -> Iterator[Item]:
        for doc in stdlib_documents():
            lines = doc.split("\n")
            ok = [i for i in range(8, len(lines)) if 6 <= len(lines[i].strip()) <= 60 and not lines[i].lstrip().startswith("#")]
            rng = random.Random(f"{seed}:{doc[:200]}")
            for i in sorted(rng.sample(ok, min(PER_DOCUMENT, len(ok)))):
                context = context_before(lines, i)
                if context.count("\n") >= 4:  # enough code before the line to go on
                    yield Item(prompt=context, answer=lines[i], key=doc)
