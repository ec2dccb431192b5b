"""Which sentence comes next? A passage of English text and four candidate next sentences (the true one and
three from other passages); chance 25%. Built from WikiText-2 (test set) or TinyStories (validation subset)
when ``../shared/data`` holds them; the split is by passage."""
from __future__ import annotations

import random
import re
from typing import Iterator

from steplab.tasks.base import Item, Task, choice_item, pick_distractors
from steplab.tasks.data import shared_data

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
CONTEXT_CHARS = 400


class _TextNext(Task):
    kind = "choice"
    chance = 0.25
    finite = True
    held_out = 0.5  # no model here trains on these sets: half of the passages are held out
    rel = ""

    def unavailable(self) -> str | None:
        return None if shared_data(self.rel) else f"{self.rel} not found under ../shared/data (set STEPLAB_SHARED)"

    def passages(self) -> list[str]:
        raise NotImplementedError

    def candidates(self, seed: int) -> Iterator[Item]:
        passages = [[s.strip() for s in SENTENCE_END.split(p) if s.strip()] for p in self.passages()]
        passages = [p for p in passages if len(p) >= 3]
        for side in ("train", "test"):
            own = [p for p in passages if self.split_of(Item("", "", key=" ".join(p))) == side]
            pool = [s for p in own for s in p if 20 <= len(s) <= 200]
            for p in own:
                key = " ".join(p)
                rng = random.Random(f"{seed}:{key[:200]}")
                i = rng.randrange(2, len(p))
                if not 20 <= len(p[i]) <= 200:
                    continue
                picks = pick_distractors(rng, pool, p[i], 3)
                if picks is None:
                    continue
                context = " ".join(p[:i])[-CONTEXT_CHARS:]
                yield choice_item(rng, context, " " + p[i], [" " + s for s in picks], key=key)


class WikiTextNext(_TextNext):
    name = "wikitext2_next"
    rel = "wikitext2/test.txt"
    description = "which of 4 sentences continues a WikiText-2 test paragraph"

    def passages(self) -> list[str]:
        lines = shared_data(self.rel).read_text(encoding="utf-8").split("\n")
        return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("=")]


class TinyStoriesNext(_TextNext):
    name = "tinystories_next"
    rel = "tinystories/tinystories_val_subset.txt"
    description = "which of 4 sentences continues a TinyStories story"

    def passages(self) -> list[str]:
        text = shared_data(self.rel).read_text(encoding="utf-8")
        return [p.replace("\n", " ").strip() for p in re.split(r"\n\s*\n|<\|endoftext\|>", text) if p.strip()]
