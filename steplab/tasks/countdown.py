"""Countdown (TinyZero's RL task): reach a target from 3-4 numbers with + - * / and parentheses, each number
used exactly once. The answer is one expression on one line, e.g. ``Use 3 5 8 to make 24.\\nAnswer: (8-5)*8``
would be wrong (8 used twice) while ``3*8*(?)``-style guesses fail the value check.

Grading parses the expression with the small recursive-descent parser below (exact rational arithmetic with
:class:`fractions.Fraction`), never ``eval``: only digits, ``+ - * / ( )`` and spaces are accepted, the text is
at most ``MAX_CHARS`` long and nesting at most ``MAX_DEPTH`` deep, so any model output is graded in bounded time.

Items are generated from a seeded RNG: numbers in 1..``max_number``, a random expression tree over them whose
value is a whole number in 1..``max_target`` (so every item has a solution: the reference answer). Splits are
by a hash of the prompt (5% held out), as for every generated task.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from fractions import Fraction
from typing import Iterator

from steplab.tasks.base import Item, Task

MAX_CHARS = 64
MAX_DEPTH = 8
TOKEN = re.compile(r"\s*(?:(\d{1,4})|([-+*/()]))")


class ParseError(ValueError):
    pass


def parse_expression(text: str) -> tuple[Fraction, list[int]]:
    """(value, the integer literals used) of an arithmetic expression; ParseError when it is not one."""
    text = text.strip()
    if not text:
        raise ParseError("empty expression")
    if len(text) > MAX_CHARS:
        raise ParseError(f"expression longer than {MAX_CHARS} characters")
    tokens, pos = [], 0
    while pos < len(text):
        m = TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ParseError(f"unexpected character {text[pos]!r} at {pos}")
        tokens.append(int(m.group(1)) if m.group(1) is not None else m.group(2))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    numbers: list[int] = []
    at = 0

    def peek():
        return tokens[at] if at < len(tokens) else None

    def take():
        nonlocal at
        at += 1
        return tokens[at - 1]

    def expr(depth: int) -> Fraction:  # expr := term (('+'|'-') term)*
        value = term(depth)
        while peek() in ("+", "-"):
            op, rhs = take(), term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(depth: int) -> Fraction:  # term := atom (('*'|'/') atom)*
        value = atom(depth)
        while peek() in ("*", "/"):
            op, rhs = take(), atom(depth)
            if op == "/" and rhs == 0:
                raise ParseError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def atom(depth: int) -> Fraction:  # atom := number | '(' expr ')'
        tok = peek()
        if isinstance(tok, int):
            take()
            numbers.append(tok)
            return Fraction(tok)
        if tok == "(":
            if depth >= MAX_DEPTH:
                raise ParseError(f"parentheses nested deeper than {MAX_DEPTH}")
            take()
            value = expr(depth + 1)
            if peek() != ")":
                raise ParseError("missing ')'")
            take()
            return value
        raise ParseError(f"expected a number or '(' but got {tok!r}")

    value = expr(0)
    if at != len(tokens):
        raise ParseError(f"unexpected {tokens[at]!r} after the expression")
    return value, numbers


def check_solution(expression: str, numbers: list[int], target: int) -> tuple[bool, bool]:
    """(correct, well_formed): well formed = parses; correct = uses exactly ``numbers`` and equals ``target``."""
    try:
        value, used = parse_expression(expression)
    except ParseError:
        return False, False
    return Counter(used) == Counter(numbers) and value == target, True


def random_expression(rng: random.Random, numbers: list[int]) -> tuple[str, Fraction | None]:
    """A random fully parenthesised expression using every number once (in a random order) and its value
    (None after a division by zero)."""
    parts: list[tuple[str, Fraction | None]] = [(str(n), Fraction(n)) for n in numbers]
    rng.shuffle(parts)
    while len(parts) > 1:
        i = rng.randrange(len(parts) - 1)
        op = rng.choice("+-*/")
        (a, x), (b, y) = parts[i], parts[i + 1]
        if x is None or y is None or (op == "/" and y == 0):
            value = None
        else:
            value = x + y if op == "+" else x - y if op == "-" else x * y if op == "*" else x / y
        parts[i:i + 2] = [(f"({a}{op}{b})", value)]
    return parts[0]


def strip_outer(expr: str) -> str:
    """Drop one pair of parentheses around the whole expression, when they match each other."""
    if expr.startswith("(") and expr.endswith(")"):
        depth = 0
        for i, c in enumerate(expr):
            depth += c == "("
            depth -= c == ")"
            if depth == 0 and i < len(expr) - 1:
                return expr
        return expr[1:-1]
    return expr


def format_prompt(numbers: list[int], target: int) -> str:
    return f"Use {' '.join(map(str, numbers))} to make {target}.\nAnswer:"


PROMPT = re.compile(r"Use ((?:\d+ ?)+) to make (\d+)\.")


class Countdown(Task):
    name = "countdown"
    kind = "generate"
    chance = 0.0
    max_tokens = 32
    stop = ("\n",)
    description = "Countdown: reach the target from 3-4 numbers with + - * / (each number once), safe-parsed"
    sizes: tuple[int, ...] = (3, 4)
    max_number = 20
    max_target = 200

    def candidates(self, seed: int) -> Iterator[Item]:
        rng = random.Random(f"{self.name}:{seed}")
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(rng.choice(self.sizes))]
            expr, value = random_expression(rng, numbers)
            if value is None or value.denominator != 1 or not 1 <= value <= self.max_target:
                continue
            yield Item(prompt=format_prompt(numbers, int(value)), answer=strip_outer(expr))

    @staticmethod
    def numbers_target(item: Item) -> tuple[list[int], int]:
        m = PROMPT.search(item.prompt)
        if m is None:
            raise ValueError(f"not a countdown prompt: {item.prompt!r}")
        return [int(x) for x in m.group(1).split()], int(m.group(2))

    def check(self, item: Item, output: str) -> tuple[bool, bool]:
        """(correct, well_formed) of a completion (the text after "Answer:")."""
        numbers, target = self.numbers_target(item)
        return check_solution(output, numbers, target)

    def grade(self, item: Item, output: str) -> bool:
        return self.check(item, output)[0]

    def answer_key(self, item: Item, output: str) -> str | None:
        """What majority voting compares: the value reached and the numbers used (None: unreadable)."""
        try:
            value, used = parse_expression(output)
        except ParseError:
            return None
        return f"{value}|{sorted(used)}"


class Countdown3(Countdown):
    """Three numbers in 1..12, targets up to 100: the size a <= 5M-parameter model can start on (about 20k
    distinct problems; 10% held out, so more than 1,000 held-out problems)."""

    name = "countdown3"
    sizes = (3,)
    max_number = 12
    max_target = 100
    held_out = 0.10
    description = "Countdown with 3 numbers in 1..12 (the small-model RL task), safe-parsed"
