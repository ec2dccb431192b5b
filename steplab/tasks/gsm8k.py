"""GSM8K (grade-school math) from ``../shared/data/gsm8k`` when present: generate an answer, graded by its
last number against the reference's ``#### N``. Held-out split = the official test set; train = the train set
minus any question also in test. Chance 0."""
from __future__ import annotations

import json
import re
from typing import Iterator

from steplab.tasks.base import Item, Task
from steplab.tasks.data import shared_data

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _number(text: str) -> str | None:
    found = NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


class GSM8K(Task):
    name = "gsm8k"
    kind = "generate"
    chance = 0.0
    finite = True
    max_tokens = 128
    stop = ("\n\n", "Question:")
    description = "GSM8K test questions, final number exact match (zero-shot)"

    def unavailable(self) -> str | None:
        return None if shared_data("gsm8k/test.jsonl") else "gsm8k not found under ../shared/data (set STEPLAB_SHARED)"

    def split_of(self, item: Item) -> str:
        return item.key

    def candidates(self, seed: int) -> Iterator[Item]:
        for split, fname in (("train", "train.jsonl"), ("test", "test.jsonl")):
            for line in shared_data(f"gsm8k/{fname}").read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                answer = row["answer"].split("####")[-1].strip().replace(",", "")
                yield Item(prompt=f"Question: {row['question']}\nAnswer:", answer=answer, key=split)

    def check(self, item: Item, output: str) -> tuple[bool, bool]:
        """(correct, well_formed): well formed = the completion contains a number (its last one is the answer)."""
        got = _number(output)
        return got == item.answer, got is not None

    def answer_key(self, item: Item, output: str) -> str | None:
        return _number(output)

    def grade(self, item: Item, output: str) -> bool:
        return self.check(item, output)[0]
