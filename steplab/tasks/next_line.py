"""Which line follows a ``def``? Four candidate lines after a standard-library function header (the true
next line and three next lines of other functions, re-indented alike); chance 25%."""
from __future__ import annotations

import random
from typing import Iterator

from steplab.tasks.base import Item, Task, choice_item, pick_distractors
from steplab.tasks.code import reindent, stdlib_functions


class NextLine(Task):
    name = "next_line"
    kind = "choice"
    chance = 0.25
    finite = True
    description = "which of 4 lines follows a def header in the Python stdlib (held-out files)"

    def candidates(self, seed: int) -> Iterator[Item]:
        fns = [f for f in stdlib_functions() if f.next_line.strip()]
        for side in ("train", "test"):  # distractors come from the same split as the item
            pool_fns = [f for f in fns if self.split_of(Item("", "", key=f.doc)) == side]
            pool = [f.next_line.strip() for f in pool_fns]
            for f in pool_fns:
                rng = random.Random(f"{seed}:{f.doc[:64]}:{f.header}:{f.context[-64:]}")
                picks = pick_distractors(rng, pool, f.next_line.strip(), 3)
                if picks is None:
                    continue
                distractors = [reindent(p, f.next_line) + "\n" for p in picks]
                yield choice_item(rng, f.context + f.header + "\n", f.next_line + "\n", distractors, key=f.doc)
