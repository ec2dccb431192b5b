"""The downstream suite: tasks that need no download, each with its chance level, as a table in the run.

``small``: three code tasks from the Python standard library, held out from the quickstart's training data
(the real line or the same line with two words swapped, which line follows a ``def``, which docstring
belongs to a function, complete the next line), plus the
standard sets in ``../shared/data`` when present (WikiText-2 and TinyStories next-sentence choice, GSM8K);
the result says which of those were found and which were skipped.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from steplab.eval.runner import EngineLM
from steplab.eval.task_eval import run_task
from steplab.tasks import get_task
from steplab.utils import atomic_write_json, atomic_write_text

# (task, items): None = the whole held-out split
SUITES: dict[str, list[tuple[str, int | None]]] = {
    "small": [("line_order", 500), ("next_line", 500), ("docstring", None), ("complete_line", 500),
              ("wikitext2_next", 500), ("tinystories_next", 500), ("gsm8k", 100)],
}
SHARED_TASKS = {"wikitext2_next": "WikiText-2", "tinystories_next": "TinyStories", "gsm8k": "GSM8K"}


@functools.lru_cache(maxsize=64)
def task_items(task_name: str, n: int | None, seed: int) -> tuple:
    """A task's held-out items, built once per process: a suite over a sweep scores the same items on every run,
    and building them (parsing the standard library's sources) cost more than scoring them on the small runs."""
    return tuple(get_task(task_name).items("test", n, seed))


def suite_tasks(name: str) -> list[tuple[str, int | None]]:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; available: {', '.join(SUITES)}")
    return SUITES[name]


def run_suite(lm: EngineLM, name: str = "small", *, scale: float = 1.0, seed: int = 0, progress=None,
              previous: dict | None = None) -> dict:
    """Every task of the suite on ``lm``; ``scale`` < 1 shrinks the item counts (quick looks at a sweep).
    Results in ``previous`` (an earlier run of this suite with the same seed) are kept, not recomputed."""
    results, skipped = [], []
    kept = {r["task"]: r for r in previous["results"]} if previous and previous.get("seed") == seed else {}
    for task_name, n in suite_tasks(name):
        if task_name in kept:
            results.append(kept[task_name])
            continue
        task = get_task(task_name)
        reason = task.unavailable()
        if reason:
            skipped.append({"task": task_name, "reason": reason})
            continue
        count = None if n is None else max(20, int(n * scale))
        if n is None and scale < 1:
            count = max(20, int(len(task_items(task_name, None, seed)) * scale))
        res = run_task(lm, task, count, seed, items=list(task_items(task_name, count, seed)))
        results.append({**res.to_dict(), "description": task.description})
        if progress:
            progress(res)
    used = [SHARED_TASKS[r["task"]] for r in results if r["task"] in SHARED_TASKS]
    return {"suite": name, "seed": seed, "scale": scale, "results": results, "skipped": skipped, "shared_data_used": used}


def suite_markdown(result: dict, title: str | None = None) -> str:
    lines = [f"## {title or 'Downstream suite: ' + result['suite']}", "",
             "| task | kind | items | accuracy | 95% interval | chance | above chance |",
             "|---|---|---:|---:|---|---:|---|"]
    for r in result["results"]:
        lines.append(f"| {r['task']} | {r['kind']} | {r['n']} | {r['accuracy']:.1%} | {r['ci_low']:.1%}-{r['ci_high']:.1%} "
                     f"| {r['chance']:.0%} | {'yes' if r['above_chance'] else 'no'} |")
    lines.append("")
    used = result.get("shared_data_used") or []
    lines.append("Standard sets from ../shared/data used: " + (", ".join(used) if used else "none") + ".")
    for s in result["skipped"]:
        lines.append(f"Skipped {s['task']}: {s['reason']}.")
    lines.append("Choice tasks pick the choice with the highest mean log-probability per byte; the interval is "
                 "Wilson's; held-out items only.")
    return "\n".join(lines) + "\n"


def save_suite(run_dir: str | Path, result: dict) -> Path:
    """``RUN/eval/suite_NAME.json`` and ``.md`` (atomic writes), and the table in the run's ``report.md`` (its
    section replaced on a rerun); returns the Markdown path."""
    out = Path(run_dir) / "eval"
    atomic_write_json(out / f"suite_{result['suite']}.json", result)
    md = out / f"suite_{result['suite']}.md"
    table = suite_markdown(result)
    atomic_write_text(md, table)
    report = Path(run_dir) / "report.md"
    if report.is_file():
        text = report.read_text()
        heading = table.splitlines()[0]
        start = text.find(heading)
        if start >= 0:
            end = text.find("\n## ", start + len(heading))
            text = text[:start] + (text[end + 1:] if end >= 0 else "")
        atomic_write_text(report, text.rstrip() + "\n\n" + table)
    return md


def load_suite(run_dir: str | Path, name: str = "small") -> dict | None:
    path = Path(run_dir) / "eval" / f"suite_{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None
