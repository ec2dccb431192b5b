"""Test-time scaling: pass@k, majority vote (self-consistency) and best-of-N from N samples per problem.

- pass@k: the unbiased estimator of Chen et al. (2021), 1 - C(n - c, k) / C(n, k) for c correct of n samples;
  pass@1 is the mean accuracy of single temperature-1 samples.
- maj@k: the answer most of the first k samples agree on (the task's ``answer_key``: the final number for
  GSM8K, the value and numbers used for Countdown; unreadable or truncated answers do not vote; ties go to
  the answer seen first) is graded.
- best-of-k: the first k samples ranked by a verifier (an outcome reward model, ``steplab.eval.verifier``);
  the oracle ranks by the grader itself, so its best-of-k is the upper bound (= the fraction of problems with
  at least one correct answer among the first k).
"""
from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

KS = (1, 2, 4, 8, 16, 32)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(answers: list[dict]) -> bool:
    votes = Counter(a["key"] for a in answers if a["key"] is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(a["key"] for a in answers if a["key"] is not None and votes[a["key"]] == top)
    return any(a["correct"] for a in answers if a["key"] == winner)


def best_of_correct(answers: list[dict], scores: list[float]) -> bool:
    best = max(range(len(answers)), key=lambda i: (scores[i], -i))
    return answers[best]["correct"]


def scaling_table(graded: list[list[dict]], scores: list[list[float]] | None = None, ks=KS) -> dict[str, dict[int, float]]:
    """{metric: {k: accuracy}} for pass@k, maj@k, oracle best-of-k and (with ``scores``) verifier best-of-k."""
    n = len(graded[0])
    ks = [k for k in ks if k <= n]
    out: dict[str, dict[int, float]] = {"pass": {}, "maj": {}, "oracle": {}}
    if scores is not None:
        out["verifier"] = {}
    P = len(graded)
    for k in ks:
        out["pass"][k] = sum(pass_at_k(n, sum(a["correct"] for a in row), k) for row in graded) / P
        out["maj"][k] = sum(majority_correct(row[:k]) for row in graded) / P
        out["oracle"][k] = sum(any(a["correct"] for a in row[:k]) for row in graded) / P
        if scores is not None:
            out["verifier"][k] = sum(best_of_correct(row[:k], s[:k]) for row, s in zip(graded, scores)) / P
    out["format_violation"] = {n: sum(not a["well_formed"] for row in graded for a in row) / (P * n)}
    return out


def run_tts(run: str | Path, task_name: str, samples: int, n_items: int = 500, seed: int = 0,
            verifier: str | Path | None = None, device: str = "cpu", label: str | None = None,
            checkpoint: str | Path | None = None) -> dict:
    """Sample ``samples`` answers to ``n_items`` held-out problems of ``task_name`` and score every method."""
    from steplab.eval.sampling import sample_answers
    from steplab.eval.verifier import encode_answer, load_verifier, score
    from steplab.tasks import get_task
    from steplab.train.checkpoint import load_run

    t0 = time.time()
    task = get_task(task_name)
    _, model, tok, step = load_run(run, device=device, checkpoint=checkpoint)
    items = task.items("test", n_items, seed)
    graded = sample_answers(model.float(), tok, task, items, samples, task.max_tokens, seed)
    scores = None
    if verifier is not None:
        orm, _ = load_verifier(verifier, device)
        flat = [encode_answer(tok, items[i].prompt, a["text"]) for i, row in enumerate(graded) for a in row]
        s = score(orm, flat, tok.pad_id)
        scores = [s[i * samples:(i + 1) * samples] for i in range(len(items))]
    table = scaling_table(graded, scores)
    return {"run": str(run), "label": label or Path(run).name, "task": task_name, "items": len(items), "samples": samples,
            "step": step, "verifier": str(verifier) if verifier else None, "table": table,
            "seconds": round(time.time() - t0, 1)}


def plot_scaling(results: list[dict], path: str | Path) -> None:
    """Accuracy vs k (log2 axis): pass@k, maj@k, best-of-k (verifier, oracle) for each result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"pass": "-", "maj": "--", "verifier": "-.", "oracle": ":"}
    for i, res in enumerate(results):
        color = f"C{i}"
        for metric, style in styles.items():
            row = res["table"].get(metric)
            if row:
                ks = sorted(int(k) for k in row)
                ax.plot(ks, [row[k] if k in row else row[str(k)] for k in ks], style, color=color, marker="o", ms=3,
                        label=f"{res['label']} {metric}@k")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel(f"held-out accuracy ({results[0]['task']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
