"""Many temperature-1 samples per problem through the serving engine, graded by the task: the raw material of
pass@k, majority voting and best-of-N (``steplab.eval.tts``) and of the verifier's training data."""
from __future__ import annotations

import random

from steplab.infer.engine import Engine, Request


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Plain text after BOS (the format the task models are trained on; RL formats prompts the same way)."""
    return [tokenizer.bos_id] + tokenizer.encode(prompt)


def sample_answers(model, tokenizer, task, items, samples: int, max_tokens: int, seed: int = 0,
                   temperature: float = 1.0, max_batch: int = 64) -> list[list[dict]]:
    """For each item, ``samples`` graded answers: {text, correct, well_formed, finish, key} (key: the answer the
    task votes on, None when unreadable). A correct answer must also have ended normally (not truncated)."""
    per_request = min(samples, max_batch)
    engine = Engine(model, tokenizer, name="sample", max_batch=max_batch, max_queue=1 << 30).start()
    try:
        handles = []
        for i, it in enumerate(items):
            ids = prompt_ids(tokenizer, it.prompt)
            for start in range(0, samples, per_request):
                n = min(per_request, samples - start)
                s = random.Random(f"{seed}:{i}:{start}").randrange(1 << 31)
                handles.append((i, n, engine.submit(Request(prompt=ids, max_tokens=max_tokens, temperature=temperature,
                                                              seed=s, n=n, stop=tuple(task.stop),
                                                              stop_ids=frozenset({tokenizer.eos_id})))))
        out: list[list[dict]] = [[] for _ in items]
        for i, n, handle in handles:
            texts, finish = [""] * n, [""] * n
            for ev in handle:
                if ev.error:
                    raise RuntimeError(ev.error)
                texts[ev.index] += ev.text
                if ev.finish_reason:
                    finish[ev.index] = ev.finish_reason
            for text, fin in zip(texts, finish):
                out[i].append(grade_answer(task, items[i], text, fin))
        return out
    finally:
        engine.stop()


def grade_answer(task, item, text: str, finish: str) -> dict:
    check = getattr(task, "check", None)
    correct, well = check(item, text) if check else (task.grade(item, text), True)
    ended = finish == "stop"
    key_of = getattr(task, "answer_key", None)
    key = key_of(item, text) if key_of else text.strip()
    return {"text": text, "correct": bool(correct and ended), "well_formed": bool(well and ended), "finish": finish,
            "key": key if ended else None}
