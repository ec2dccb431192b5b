"""Multi-digit addition and subtraction with worked column steps, as a chat task (SFT data, eval, RL reward).

A reply works the columns from the ones up, then states the result::

    47 + 85:
    ones: 7 + 5 + 0 = 12, write 2, carry 1
    tens: 4 + 8 + 1 = 13, write 3, carry 1
    hundreds: carry 1, write 1
    Answer: 132

Subtraction borrows the same way; a negative result is worked as ``-(b - a)``. The split key is the problem
with its operands in canonical order (``a+b`` and ``b+a`` are one key), so a held-out sum is never trained in
either order. :meth:`Arithmetic.grade` (and :func:`reward` for RL) read the reply's final integer with
``steplab.tasks.chat.answer_int``.
"""
from __future__ import annotations

import random
from typing import Iterator

from steplab.tasks.base import Item
from steplab.tasks.chat import ChatTask, answer_int

PLACES = ["ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands"]
PROMPTS = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "Calculate {a} {op} {b}."]


def worked_steps(a: int, b: int, op: str) -> str:
    """The reply for ``a op b``: column steps and the answer line."""
    if op == "-" and a < b:
        return f"{a} - {b} = -({b} - {a})\n" + worked_steps(b, a, "-").replace("Answer: ", "Answer: -", 1).replace(
            "Answer: -0", "Answer: 0")
    xs, ys = str(a)[::-1], str(b)[::-1]
    lines, digits, carry = [f"{a} {op} {b}:"], [], 0
    for i in range(max(len(xs), len(ys))):
        x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        if op == "+":
            s = x + y + carry
            lines.append(f"{PLACES[i]}: {x} + {y} + {carry} = {s}, write {s % 10}, carry {s // 10}")
            digits.append(s % 10)
            carry = s // 10
        else:
            d = x - y - carry
            if d < 0:
                lines.append(f"{PLACES[i]}: {x} - {y} - {carry} < 0, so {x + 10} - {y} - {carry} = {d + 10}, "
                             f"write {d + 10}, borrow 1")
                digits.append(d + 10)
                carry = 1
            else:
                lines.append(f"{PLACES[i]}: {x} - {y} - {carry} = {d}, write {d}, borrow 0")
                digits.append(d)
                carry = 0
    if op == "+" and carry:
        lines.append(f"{PLACES[len(digits)]}: carry {carry}, write {carry}")
        digits.append(carry)
    result = int("".join(str(d) for d in reversed(digits)))
    lines.append(f"Answer: {result}")
    return "\n".join(lines)


def problem_item(rng: random.Random, a: int, b: int, op: str) -> Item:
    prompt = rng.choice(PROMPTS).format(a=a, op=op, b=b)
    key = f"{min(a, b)}{op}{max(a, b)}" if op == "+" else f"{a}{op}{b}"
    answer = a + b if op == "+" else a - b
    return Item(prompt=prompt, answer=str(answer), key=key, messages=(("user", prompt),), reply=worked_steps(a, b, op))


def reward(item: Item, reply: str) -> float:
    """1.0 when the reply's final integer is the answer, else 0.0 (for RL)."""
    return float(answer_int(reply) == int(item.answer))


class Arithmetic(ChatTask):
    """Addition and subtraction of 1- to 3-digit numbers (an endless generator)."""

    name = "arithmetic"
    description = "add/subtract 1-3 digit numbers with worked column steps (chat; held-out problems)"
    ops = ("+", "-")
    digits = (1, 3)
    max_tokens = 160

    def operand(self, rng: random.Random) -> int:
        n = rng.randint(*self.digits)
        return rng.randint(10 ** (n - 1) if n > 1 else 0, 10**n - 1)

    def candidates(self, seed: int) -> Iterator[Item]:
        rng = random.Random(seed)
        while True:
            yield problem_item(rng, self.operand(rng), self.operand(rng), rng.choice(self.ops))

    def grade(self, item: Item, output: str) -> bool:
        return answer_int(output) == int(item.answer)


class Add2(Arithmetic):
    """Every 2-digit + 2-digit sum (a finite pool of 4,095 problems up to order; 5% held out)."""

    name = "add2"
    description = "2-digit + 2-digit addition with worked column steps (chat; held-out sums in neither order)"
    finite = True
    ops = ("+",)
    digits = (2, 2)
    max_tokens = 96

    def candidates(self, seed: int) -> Iterator[Item]:
        rng = random.Random(seed)
        for a in range(10, 100):
            for b in range(10, 100):
                yield problem_item(rng, a, b, "+")
