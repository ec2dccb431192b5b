"""Run a task (``steplab.tasks``) on a model through the engine: accuracy, its 95% interval, chance level."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

from steplab.eval.runner import EngineLM
from steplab.tasks import Task


@dataclass
class TaskResult:
    task: str
    kind: str
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    chance: float
    above_chance: bool  # the interval's lower end lies above chance
    seconds: float
    split: str = "test"
    format_ok: int | None = None  # chat tasks: replies that end with <|end|> before the token cap, no other marker
    format_rate: float | None = None
    outputs: list | None = None  # chat tasks with keep_outputs: (prompt, reply, graded correct) per item

    def to_dict(self) -> dict:
        return asdict(self)


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default); behaves at 0 and n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # exact ends at k = 0 and k = n (rounding would otherwise leave 1e-17 and call 0/n "above chance 0")
    return (0.0 if k == 0 else max(0.0, mid - half)), (1.0 if k == n else min(1.0, mid + half))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """[bos] + context ids, continuation ids; the continuation is the tail of encode(context + continuation),
    as lm-evaluation-harness splits it, so a token spanning the boundary counts for the continuation."""
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    n = len(ctx)
    while n > 0 and whole[:n] != ctx[:n]:
        n -= 1
    return [tokenizer.bos_id] + whole[:n], whole[n:]


def run_task(lm: EngineLM, task: Task, n: int | None = 500, seed: int = 0, split: str = "test",
             keep_outputs: bool = False, items: list | None = None) -> TaskResult:
    """``items``: ``task.items(split, n, seed)`` computed by the caller (a suite over many runs builds them once)."""
    t0 = time.time()
    if items is None:
        items = task.items(split, n, seed)  # a finite pool smaller than n: all of it
    tok = lm.tokenizer
    if task.kind == "choice":
        pairs, sizes = [], []
        for it in items:
            for c in it.choices:
                pairs.append(encode_pair(tok, it.prompt, c))
                sizes.append(max(1, len(c.encode("utf-8"))))
        scores = [lp / (size if task.score_by == "byte" else 1) for (lp, _), size in zip(lm.loglikelihood(pairs), sizes)]
        correct, pos = 0, 0
        for it in items:
            row = scores[pos:pos + len(it.choices)]
            pos += len(it.choices)
            correct += int(max(range(len(row)), key=row.__getitem__) == it.label)
    elif task.kind == "generate":
        outs = lm.generate([[tok.bos_id] + tok.encode(it.prompt) for it in items], task.max_tokens, task.stop)
        correct = sum(int(task.grade(it, o)) for it, o in zip(items, outs))
    elif task.kind == "chat":
        return _run_chat(lm, task, items, t0, split, keep_outputs)
    else:
        raise ValueError(f"task {task.name!r} has unknown kind {task.kind!r}")
    lo, hi = wilson(correct, len(items))
    return TaskResult(task.name, task.kind, len(items), correct, correct / max(1, len(items)), lo, hi, task.chance,
                      lo > task.chance, round(time.time() - t0, 2), split)


def _run_chat(lm: EngineLM, task: Task, items: list, t0: float, split: str, keep_outputs: bool) -> TaskResult:
    """Each item's conversation under the one chat template, answered greedily until a turn marker; graded."""
    from steplab.data.chat import end_id, prompt_ids, reply_stop_ids
    from steplab.tasks.chat import messages_of

    tok = lm.tokenizer
    replies = lm.chat([prompt_ids(messages_of(it), tok) for it in items], task.max_tokens, reply_stop_ids(tok))
    graded = [task.grade(it, text) for it, (text, _, _) in zip(items, replies)]
    end = end_id(tok)
    formatted = sum(int(finish == "stop" and bool(tokens) and tokens[-1] == end) for _, tokens, finish in replies)
    correct = sum(graded)
    lo, hi = wilson(correct, len(items))
    outputs = [(it.prompt, text, ok) for it, (text, _, _), ok in zip(items, replies, graded)] if keep_outputs else None
    return TaskResult(task.name, task.kind, len(items), correct, correct / max(1, len(items)), lo, hi, task.chance,
                      lo > task.chance, round(time.time() - t0, 2), split, formatted, formatted / max(1, len(items)),
                      outputs)
