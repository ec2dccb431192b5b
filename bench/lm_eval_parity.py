"""lm-evaluation-harness over HTTP (local-completions -> `steplab serve`'s /v1/completions with echo + logprobs)
and in process (the `steplab` lm_eval model) on the same local task: accuracies must be equal to the last digit
(fp32). Also reports the largest difference between the two paths' per-choice log-likelihoods.

    python bench/lm_eval_parity.py DENSE_RUN MOE_RUN [--tasks steplab_next_line]

The task YAMLs are tests/lm_eval_tasks (local json files, no download)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--tasks", default="steplab_next_line")
    args = ap.parse_args()
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from serve_fixtures import Server

    from steplab.eval.harness import SteplabLM
    from steplab.eval.runner import EngineLM
    from steplab.serve.app import create_app

    tasks_dir = ROOT / "tests" / "lm_eval_tasks"
    os.chdir(tasks_dir)
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    tasks = args.tasks.split(",")
    for run in args.runs:
        lm = EngineLM.from_run(run, device="cpu", dtype="fp32", max_batch=8)
        ctx = lm.context_len
        app = create_app({"m": lm.engine}, api_keys=None)
        with Server(app) as srv:
            http = simple_evaluate(model="local-completions", tasks=tasks, task_manager=manager, log_samples=True, model_args={
                "model": "m", "base_url": srv.url + "/v1/completions", "tokenizer": str(Path(run) / "tokenizer"),
                "tokenizer_backend": "huggingface", "batch_size": 8, "max_length": ctx - 1})
            local = simple_evaluate(model=SteplabLM(lm=lm, max_length=ctx - 1), tasks=tasks, task_manager=manager, log_samples=True)
        lm.close()
        for t in tasks:
            a, b = http["results"][t], local["results"][t]
            diffs = [abs(x[0][0] - y[0][0]) for sa, sb in zip(http["samples"][t], local["samples"][t])
                     for x, y in zip(sa["resps"], sb["resps"])]
            keys = [k for k in a if k.endswith(",none") and "stderr" not in k]
            same = all(a[k] == b[k] for k in keys)
            shown = ", ".join(f"{k.split(',')[0]} http {a[k]!r} / in-process {b[k]!r}" for k in keys)
            print(f"{Path(run).name} {t} ({len(http['samples'][t])} docs): {shown}; identical: {same}; "
                  f"max |loglik diff| {max(diffs):.2e}")


if __name__ == "__main__":
    main()
