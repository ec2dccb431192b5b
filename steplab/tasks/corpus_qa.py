"""Questions about the embedded corpus (chat): what does a standard-library function's docstring say?

    user: In the Python standard library, what does the docstring of `def quote(string, safe='/'):` say?
    assistant: Answer: Quote the string for use in a URL.

Only functions of documents in the pretraining split's *train* side (``steplab data prepare``'s hash, 5%) are
asked about, so the base model has read every answer; the task's own split (by the def line) decides which
questions SFT trains on and which are held out. Names defined more than once are skipped (ambiguous).
Graded by exact match of the answer line, case and surrounding space ignored.
"""
from __future__ import annotations

import collections
import random
import re
from typing import Iterator

from steplab.tasks.base import HELD_OUT_FRACTION, Item
from steplab.tasks.chat import ChatTask

NAME = re.compile(r"def (\w+)\(")
PROMPTS = ["In the Python standard library, what does the docstring of `{h}` say?",
           "What does the docstring of the stdlib function `{h}` say?"]


class CorpusQA(ChatTask):
    name = "corpus_qa"
    description = "what a stdlib function's docstring says (chat; documents the base model trained on)"
    finite = True
    max_tokens = 48

    def candidates(self, seed: int) -> Iterator[Item]:
        from steplab.data.sources import split_of
        from steplab.tasks.code import stdlib_functions

        fns = [f for f in stdlib_functions() if 10 <= len(f.docstring) <= 100 and NAME.search(f.header)
               and not NAME.search(f.header).group(1).startswith("_")]
        counts = collections.Counter(NAME.search(f.header).group(1) for f in fns)
        rng = random.Random(seed)
        for f in fns:
            if counts[NAME.search(f.header).group(1)] != 1 or split_of(f.doc, HELD_OUT_FRACTION) != "train":
                continue
            header = f.header.strip()
            prompt = rng.choice(PROMPTS).format(h=header)
            yield Item(prompt=prompt, answer=f.docstring.strip(), key=header, messages=(("user", prompt),),
                       reply=f"Answer: {f.docstring.strip()}")
