"""Countdown's safe parser and grader, GSM8K's grading, and the task registry's splits for the RL tasks."""
from __future__ import annotations

from fractions import Fraction

import pytest

from steplab.tasks import Item, get_task
from steplab.tasks.countdown import MAX_CHARS, ParseError, check_solution, parse_expression


@pytest.mark.parametrize("text,value,numbers", [
    ("1+2*3", 7, [1, 2, 3]),
    ("(1+2)*3", 9, [1, 2, 3]),
    ("8/(3-1)", 4, [8, 3, 1]),
    ("7/2 + 1/2", 4, [7, 2, 1, 2]),
    (" 10 - 4 - 3 ", 3, [10, 4, 3]),  # left associative
    ("12/4/3", 1, [12, 4, 3]),
    ("2/3", Fraction(2, 3), [2, 3]),
])
def test_parse_values(text, value, numbers):
    got, used = parse_expression(text)
    assert got == value and used == numbers


@pytest.mark.parametrize("text", [
    "", "1+", "(1+2", "1+2)", "1 2", "2**3", "__import__('os')", "1/0", "5/(3-3)", "-1+2", "1e3", "a+1",
    "(" * 10 + "1" + ")" * 10, "1+" * 40 + "1",
])
def test_parse_rejects(text):
    with pytest.raises(ParseError):
        parse_expression(text)


def test_long_input_is_refused_fast():
    assert len("1+" * 40 + "1") > MAX_CHARS
    with pytest.raises(ParseError, match="longer"):
        parse_expression("(" * 100_000)


def test_check_solution():
    assert check_solution("(8-5)*3", [3, 5, 8], 9) == (True, True)
    assert check_solution("3*(8-5)", [8, 5, 3], 9) == (True, True)
    assert check_solution("(8-5)*8", [3, 5, 8], 24) == (False, True)  # 8 twice, 3 unused
    assert check_solution("8+5", [3, 5, 8], 13) == (False, True)  # 3 unused
    assert check_solution("8+5+3", [3, 5, 8], 17) == (False, True)  # wrong value
    assert check_solution("8+5+", [3, 5, 8], 16) == (False, False)  # not an expression


def test_countdown_items_are_solvable_and_split():
    task = get_task("countdown3")
    train, test = task.items("train", 300, seed=0), task.items("test", 100, seed=0)
    assert len(train) == 300 and len(test) == 100
    assert not {i.prompt for i in train} & {i.prompt for i in test}
    for it in train + test:
        numbers, target = task.numbers_target(it)
        assert len(numbers) == 3 and all(1 <= n <= 12 for n in numbers) and 1 <= target <= 100
        assert task.grade(it, it.answer) and task.grade(it, " " + it.answer + " ")
        assert not task.grade(it, it.answer + "+1")
    assert task.items("test", 20, seed=0) == test[:20]  # deterministic
    four = get_task("countdown").items("train", 200, seed=0)
    assert {len(get_task("countdown").numbers_target(i)[0]) for i in four} == {3, 4}


def test_gsm8k_grading_without_data():
    task = get_task("gsm8k")
    item = Item(prompt="Question: q\nAnswer:", answer="1250", key="test")
    assert task.check(item, " 500 + 750 = 1,250 so the answer is 1,250.") == (True, True)
    assert task.check(item, " it is 1251") == (False, True)
    assert task.check(item, " no idea") == (False, False)
