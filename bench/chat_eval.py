"""Chat model measurements (issue 15): held-out task accuracy and format adherence of runs, and the same
accuracy measured through the HTTP API with the official ``openai`` client.

    python bench/chat_eval.py tasks RUN [RUN ...] [--n 200]        # `steplab eval --task` for each run, one table
    python bench/chat_eval.py http RUN [--n 200]                    # engine vs HTTP API, item by item

``http`` serves RUN in this process (uvicorn on a free port, no auth), sends every held-out conversation of
each task through ``client.chat.completions.create(temperature=0)``, grades the replies with the task's grader
and compares each reply with the one ``steplab eval`` (``run_task``) produced: same dtype (fp32), greedy.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TASKS = ["add2", "spelling", "letter_count", "recall", "identity", "arithmetic", "corpus_qa"]


def eval_tasks(run: str, tasks: list[str], n: int, keep: bool = False) -> dict:
    from steplab.eval.runner import EngineLM
    from steplab.eval.task_eval import run_task
    from steplab.tasks import get_task

    out = {}
    with EngineLM.from_run(run, device="cpu", dtype="fp32") as lm:
        for name in tasks:
            out[name] = run_task(lm, get_task(name), n, keep_outputs=keep)
    return out


def cmd_tasks(args) -> None:
    rows = {run: eval_tasks(run, args.task, args.n) for run in args.runs}
    print("| run | " + " | ".join(args.task) + " | format (all) |")
    print("|---|" + "---|" * (len(args.task) + 1))
    for run, res in rows.items():
        ok = sum(r.format_ok for r in res.values())
        total = sum(r.n for r in res.values())
        cells = [f"{r.accuracy:.1%} ({r.correct}/{r.n})" for r in res.values()]
        print(f"| {run} | " + " | ".join(cells) + f" | {ok / total:.1%} ({ok}/{total}) |")
    print(json.dumps({run: {k: v.to_dict() for k, v in res.items()} for run, res in rows.items()}, default=str))


def cmd_http(args) -> None:
    import openai
    from serve_fixtures import Server

    from steplab.serve.app import create_app
    from steplab.tasks import get_task
    from steplab.tasks.chat import messages_of

    engine = eval_tasks(args.run, args.task, args.n, keep=True)
    app = create_app({"step-1-chat": args.run}, api_keys=None, dtype="fp32", max_batch=16)
    with Server(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
        print("| task | steplab eval | HTTP API | identical replies |")
        print("|---|---|---|---|")
        for name in args.task:
            task = get_task(name)
            items = task.items("test", args.n)
            t0 = time.time()
            same = correct = 0
            for it, (_, eval_reply, _) in zip(items, engine[name].outputs):
                r = client.chat.completions.create(model="step-1-chat", messages=messages_of(it), temperature=0,
                                                   max_tokens=task.max_tokens)
                reply = r.choices[0].message.content
                correct += task.grade(it, reply)
                same += reply == eval_reply
            e = engine[name]
            print(f"| {name} | {e.accuracy:.1%} ({e.correct}/{e.n}) | {correct / len(items):.1%} ({correct}/{len(items)}) "
                  f"| {same}/{len(items)} ({time.time() - t0:.0f} s) |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tasks")
    t.add_argument("runs", nargs="+")
    h = sub.add_parser("http")
    h.add_argument("run")
    for q in (t, h):
        q.add_argument("--n", type=int, default=200, help="held-out items per task")
        q.add_argument("--task", action="append", help=f"default: {' '.join(TASKS)}")
        q.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    args.task = args.task or TASKS
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    {"tasks": cmd_tasks, "http": cmd_http}[args.cmd](args)


if __name__ == "__main__":
    main()
