"""Verifiable tasks: each a seeded generator with train and held-out splits, a grader and a chance level.

One module per task; add yours to ``TASKS`` (name -> "module:Class"). Used by ``steplab eval RUN --task NAME``
and the downstream suite, and by SFT/RL data (``get_task(name).items("train", n)``).
"""
from __future__ import annotations

import importlib

from steplab.tasks.base import Item, Task

TASKS: dict[str, str] = {
    "next_line": "steplab.tasks.next_line:NextLine",
    "docstring": "steplab.tasks.docstring:Docstring",
    "complete_line": "steplab.tasks.complete_line:CompleteLine",
    "line_order": "steplab.tasks.line_order:LineOrder",
    "wikitext2_next": "steplab.tasks.text_next:WikiTextNext",
    "tinystories_next": "steplab.tasks.text_next:TinyStoriesNext",
    "gsm8k": "steplab.tasks.gsm8k:GSM8K",
    # chat tasks (conversations under the one chat template; SFT data, eval, RL): steplab/tasks/chat.py
    "arithmetic": "steplab.tasks.arithmetic:Arithmetic",
    "add2": "steplab.tasks.arithmetic:Add2",
    "spelling": "steplab.tasks.spelling:Spelling",
    "letter_count": "steplab.tasks.spelling:LetterCount",
    "recall": "steplab.tasks.recall:Recall",
    "repeat": "steplab.tasks.repeat:Repeat",
    "identity": "steplab.tasks.identity:Identity",
    "corpus_qa": "steplab.tasks.corpus_qa:CorpusQA",
    "countdown": "steplab.tasks.countdown:Countdown",
    "countdown3": "steplab.tasks.countdown:Countdown3",
}


def task_names() -> list[str]:
    return sorted(TASKS)


def get_task(name: str) -> Task:
    if name not in TASKS:
        from steplab.errors import StepLabError

        raise StepLabError(f"unknown task {name!r}; available: {', '.join(task_names())}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["Item", "Task", "TASKS", "get_task", "task_names"]
