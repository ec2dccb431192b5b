"""Chat tasks (steplab/tasks/chat.py and friends): reference replies grade correct, graders read answers robustly,
held-out keys never reach a training conversation of any chat task."""
from __future__ import annotations

import itertools
import random
import re

import pytest

from steplab.tasks import get_task
from steplab.tasks.arithmetic import reward, worked_steps
from steplab.tasks.chat import answer_int, final_answer

CHAT_TASKS = ["arithmetic", "add2", "spelling", "letter_count", "recall", "identity", "repeat"]


@pytest.mark.parametrize("name", CHAT_TASKS)
def test_reference_replies_grade_correct_and_splits_are_disjoint(name):
    t = get_task(name)
    n = None if t.finite else 300
    test, train = t.items("test", n), t.items("train", None if t.finite else 3000)
    assert test and train and test == t.items("test", n)  # seeded
    assert all(t.grade(it, it.reply) for it in test + train)
    assert not any(t.grade(it, "I do not know.") for it in test[:50])
    assert not {it.key or it.prompt for it in test} & {it.key or it.prompt for it in train}
    assert all(it.messages[-1][0] == "user" for it in test)
    conv = t.conversation(train[0])
    assert conv[-1] == {"role": "assistant", "content": train[0].reply}


def test_held_out_keys_appear_in_no_training_conversation():
    """Held-out words and names (spelling, letter counting, recall share one hash) and held-out sums are absent
    from every training conversation of the built-in chat set."""
    from steplab.data.conversations import builtin_conversations, parse_mix

    held = set()
    for name in ("spelling", "letter_count"):
        held |= {it.key for it in get_task(name).items("test", 200)}
    held |= {it.key for it in get_task("recall").items("test", 200)}
    held |= {w for it in get_task("repeat").items("test", 200) for w in it.answer.split()}
    sums = {(int(a), int(b)) for a, b in (it.key.split("+") for it in get_task("add2").items("test"))}
    words = set()
    seen_sums = set()
    mix = parse_mix("repeat=2")  # off by default; weighted in here so its words are checked too
    for conv in itertools.islice(builtin_conversations("train", seed=0, mix=mix), 3000):
        text = " ".join(m["content"] for m in conv)
        words |= {w.strip("'.?,").lower() for w in text.replace("'s ", " ").split()}
        for a, b in re.findall(r"(\d+) \+ (\d+)", text):
            seen_sums |= {(int(a), int(b)), (int(b), int(a))}
    assert not held & words
    assert not sums & seen_sums


def test_final_answer_is_robust():
    cases = {"Answer: 132": "132", "**Answer:** 132.": "132", "steps\nanswer = -38": "-38", "The answer is 1,234.": "1,234",
             "Final answer: `b-a-k`": "b-a-k", "Answer: 1\nmore\nAnswer: 2": "2", "no answer here": None, "Answer:": None}
    for text, want in cases.items():
        assert final_answer(text) == want, text
    assert answer_int("The answer is 1,234.") == 1234 and answer_int("Answer: \u221238") == -38
    assert answer_int("Answer: 12 or 13") is None and answer_int("12 + 5 is\n17") == 17 and answer_int("") is None


def test_worked_steps_are_right():
    rng = random.Random(0)
    for _ in range(2000):
        a, b, op = rng.randint(0, 9999), rng.randint(0, 9999), rng.choice("+-")
        steps = worked_steps(a, b, op)
        assert answer_int(steps) == (a + b if op == "+" else a - b), steps
    assert worked_steps(47, 85, "+") == ("47 + 85:\nones: 7 + 5 + 0 = 12, write 2, carry 1\n"
                                         "tens: 4 + 8 + 1 = 13, write 3, carry 1\nhundreds: carry 1, write 1\nAnswer: 132")
    item = get_task("add2").items("test")[0]
    assert reward(item, item.reply) == 1.0 and reward(item, "Answer: -1") == 0.0


def test_letter_count_and_spelling_replies():
    from steplab.tasks.spelling import count_steps

    assert count_steps("bakata", "a") == "b-a-k-a-t-a\nb!=a 0\na=a 1\nk!=a 1\na=a 2\nt!=a 2\na=a 3\nAnswer: 3"
    t = get_task("spelling")
    it = t.items("test", 1)[0]
    assert t.grade(it, "Answer: " + " ".join(it.key)) and not t.grade(it, "Answer: " + it.key[::-1] + "x")
