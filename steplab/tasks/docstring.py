"""Which docstring belongs to this function? The first line of four standard-library docstrings after a
function header and its opening quotes (the true one and three of other functions); chance 25%."""
from __future__ import annotations

import random
from typing import Iterator

from steplab.tasks.base import Item, Task, choice_item, pick_distractors
from steplab.tasks.code import stdlib_functions


class Docstring(Task):
    name = "docstring"
    kind = "choice"
    chance = 0.25
    finite = True
    description = "which of 4 docstrings belongs to a stdlib function (held-out files)"

    def candidates(self, seed: int) -> Iterator[Item]:
        fns = [f for f in stdlib_functions() if len(f.docstring) >= 10]
        for side in ("train", "test"):
            pool_fns = [f for f in fns if self.split_of(Item("", "", key=f.doc)) == side]
            pool = [f.docstring for f in pool_fns]
            for f in pool_fns:
                rng = random.Random(f"{seed}:{f.doc[:64]}:{f.header}:{f.context[-64:]}")
                picks = pick_distractors(rng, pool, f.docstring, 3)
                if picks is None:
                    continue
                quotes = f.next_line[:len(f.next_line) - len(f.next_line.lstrip())] + f.next_line.lstrip()[:3]
                yield choice_item(rng, f.context + f.header + "\n" + quotes, f.docstring, picks, key=f.doc)
