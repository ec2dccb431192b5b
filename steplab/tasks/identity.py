"""Identity (chat): the model says what it is. Graded by naming steplab; 20% of the phrasings are held out."""
from __future__ import annotations

import itertools
from typing import Iterator

from steplab.tasks.base import Item
from steplab.tasks.chat import ChatTask

REPLY = "I am a small chat model trained with steplab, a lab for scaling laws and small language models."
OPENERS = ["", "Hi! ", "Hello. ", "Hey! ", "Good morning! ", "Quick question: "]
QUESTIONS = ["Who are you?", "What are you?", "What is your name?", "Introduce yourself.", "Who made you?",
             "What model are you?", "Are you a person?", "Which system am I talking to?", "Tell me about yourself.",
             "Who trained you?", "what are you", "who are you"]


class Identity(ChatTask):
    name = "identity"
    description = "the model says it is a steplab chat model (chat; held-out phrasings)"
    finite = True
    held_out = 0.2
    max_tokens = 48

    def candidates(self, seed: int) -> Iterator[Item]:
        for opener, q in itertools.product(OPENERS, QUESTIONS):
            prompt = opener + q
            yield Item(prompt=prompt, answer="steplab", messages=(("user", prompt),), reply=REPLY)

    def grade(self, item: Item, output: str) -> bool:
        return "steplab" in output.lower()
