"""steplab.tasks (seeded generators, held-out splits without overlap, chance levels) and the task evals
through the engine: choice scoring against a full forward pass, generation against the reference sampler,
Wilson intervals, the suite's table, and the task-level fit over a sweep."""
from __future__ import annotations

import json
import random
from typing import Iterator

import pytest

from steplab.tasks import TASKS, Item, Task, get_task, task_names
from steplab.tasks.base import choice_item, split_of_key


class Sums(Task):
    """An endless generator: 'a+b=' -> the sum (a tiny arithmetic task to test the machinery)."""

    name, kind, chance, max_tokens, stop = "sums", "generate", 0.0, 4, ("\n",)

    def candidates(self, seed: int) -> Iterator[Item]:
        rng = random.Random(seed)
        while True:
            a, b = rng.randrange(10), rng.randrange(10)
            yield Item(f"{a}+{b}=", str(a + b))


def test_registry_and_unknown_task():
    from steplab.errors import StepLabError

    assert {"next_line", "docstring", "complete_line", "line_order"} <= set(task_names()) == set(TASKS)
    with pytest.raises(StepLabError, match="unknown task 'nope'.*next_line"):
        get_task("nope")


def test_generator_splits_are_seeded_disjoint_and_deduplicated():
    t = Sums()
    test, train = t.items("test", 5), t.items("train", 60)
    assert test == t.items("test", 5)  # seeded
    assert len({i.prompt for i in train}) == len(train) == 60  # no duplicates within a split
    assert not {i.prompt for i in test} & {i.prompt for i in train}  # never on both sides
    assert all(split_of_key(i.prompt) == "test" for i in test)
    with pytest.raises(ValueError, match="endless generator"):
        t.items("test")
    with pytest.raises(ValueError, match="split"):
        t.items("validation", 3)


def test_choice_item_places_the_answer_at_a_seeded_position():
    it = choice_item(random.Random(3), "p", "yes", ["a", "b", "c"], key="k")
    assert it.choices[it.label] == "yes" and sorted(it.choices) == ["a", "b", "c", "yes"]


@pytest.mark.parametrize("name", ["next_line", "docstring", "complete_line", "line_order"])
def test_stdlib_tasks_hold_out_whole_documents_of_the_prepared_corpus(name):
    from steplab.data.sources import split_of

    t = get_task(name)
    test = t.items("test", 40, seed=0)
    assert len(test) == 40 and test == t.items("test", 40, seed=0)
    # held out exactly where `steplab data prepare` (val fraction 0.05, seed 0) puts the document in val
    assert all(split_of(i.key, 0.05, 0) == "val" for i in test)
    train = t.items("train", 200, seed=0)
    assert all(split_of(i.key, 0.05, 0) == "train" for i in train)
    assert not {i.prompt for i in test} & {i.prompt for i in train}
    if name == "line_order":  # a minimal pair: the same bytes in another word order
        assert t.chance == 0.5
        assert all(len(set(i.choices)) == 2 and sorted(i.choices[0]) == sorted(i.choices[1]) for i in test)
    elif t.kind == "choice":
        assert t.chance == 0.25
        for i in test:
            assert len(i.choices) == 4 == len(set(i.choices)) and i.choices[i.label] == i.answer
    else:
        assert t.chance == 0.0 and all(i.answer.strip() and i.prompt.endswith("\n") for i in test)


def test_wilson_interval():
    from steplab.eval.task_eval import wilson

    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson(0, 20)[0] == 0.0 and wilson(20, 20)[1] == 1.0


@pytest.fixture(scope="module")
def lm():
    import torch

    from serve_fixtures import tiny_run
    from steplab.eval.runner import EngineLM
    from steplab.train.checkpoint import load_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _, model, tok, _ = load_run(tiny_run())
    with EngineLM(model, tok, max_batch=8) as runner:
        yield runner
    torch.set_num_threads(threads)


def test_choice_task_scores_equal_a_full_forward_pass(lm):
    import torch

    from steplab.eval.task_eval import encode_pair, run_task

    task = get_task("next_line")
    items = task.items("test", 12, seed=1)
    model, tok = lm.engine.model, lm.tokenizer
    correct = 0
    for it in items:
        scores = []
        for c in it.choices:
            ctx, cont = encode_pair(tok, it.prompt, c)
            ids = (ctx + cont)[-lm.context_len:]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)
            lp = sum(float(logp[t - 1, ids[t]]) for t in range(len(ids) - len(cont), len(ids)))
            scores.append(lp / len(c.encode("utf-8")))
        correct += int(max(range(4), key=scores.__getitem__) == it.label)
    res = run_task(lm, task, 12, seed=1)
    assert (res.n, res.correct, res.chance) == (12, correct, 0.25)
    assert res.ci_low <= res.accuracy <= res.ci_high and res.above_chance == (res.ci_low > 0.25)


def test_generate_task_equals_the_reference_sampler_and_grades(lm):
    from steplab.eval.task_eval import run_task
    from steplab.infer.sampling import SamplingParams, generate

    tok = lm.tokenizer
    task = Sums()
    items = task.items("test", 6)
    ref = generate(lm.engine.model, [[tok.bos_id] + tok.encode(i.prompt) for i in items],
                   SamplingParams(max_new_tokens=4, temperature=0), stop_ids={tok.eos_id})
    texts = [tok.decode(r, skip_special=True).split("\n")[0] for r in ref]
    assert lm.generate([[tok.bos_id] + tok.encode(i.prompt) for i in items], 4, ("\n",)) == texts
    res = run_task(lm, task, 6)
    assert res.correct == sum(t.strip() == i.answer for t, i in zip(texts, items))


def test_suite_table_and_saved_result(lm, tmp_path, monkeypatch):
    from steplab.eval import suite as suite_mod

    monkeypatch.setitem(suite_mod.SUITES, "tiny", [("next_line", 20), ("complete_line", 20), ("gsm8k", 20)])
    monkeypatch.setenv("STEPLAB_SHARED", str(tmp_path / "no-shared-here"))
    monkeypatch.chdir(tmp_path)
    res = suite_mod.run_suite(lm, "tiny")
    assert [r["task"] for r in res["results"]] == ["next_line", "complete_line"]
    assert res["skipped"][0]["task"] == "gsm8k" and "not found" in res["skipped"][0]["reason"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.md").write_text("# run\n\n## Loss\n\nx\n")
    md = suite_mod.save_suite(tmp_path / "run", res)
    suite_mod.save_suite(tmp_path / "run", res)  # a rerun replaces the report's section
    report = (tmp_path / "run" / "report.md").read_text()
    assert report.startswith("# run\n\n## Loss") and report.count("## Downstream suite: tiny") == 1
    text = md.read_text()
    assert "| next_line | choice | 20 |" in text and "| 25% |" in text and "Skipped gsm8k" in text
    assert suite_mod.load_suite(tmp_path / "run", "tiny")["results"] == res["results"]
    with pytest.raises(ValueError, match="unknown suite"):
        suite_mod.run_suite(lm, "huge")
    # a grown suite scores only its new task and keeps the saved results
    monkeypatch.setitem(suite_mod.SUITES, "tiny", [("next_line", 20), ("complete_line", 20), ("line_order", 20)])
    scored = []
    real = suite_mod.run_task
    monkeypatch.setattr(suite_mod, "run_task", lambda lm_, task, *a, **k: scored.append(task.name) or real(lm_, task, *a, **k))
    grown = suite_mod.run_suite(lm, "tiny", previous=res)
    assert scored == ["line_order"] and grown["results"][:2] == res["results"]


def test_task_fit_recovers_a_logistic_and_refuses_chance_noise(tmp_path):
    import numpy as np

    from steplab.eval.taskfit import fit_sweep, fit_task, predict, save_prediction

    C = np.logspace(12, 15, 7)
    acc = 0.25 + 0.75 / (1 + np.exp(-(-30.0 + 2.2 * np.log10(C))))
    fit = fit_task(list(C), list(acc), 0.25, [True] * 7)
    assert fit["a"] == pytest.approx(-30.0, rel=1e-3) and fit["b"] == pytest.approx(2.2, rel=1e-3)
    assert predict(fit, 1e16, 0.25) == pytest.approx(0.25 + 0.75 / (1 + np.exp(-(-30.0 + 2.2 * 16))), rel=1e-4)
    assert "too close to chance" in fit_task([1e12, 1e13, 1e14], [0.26, 0.24, 0.27], 0.25, [False] * 3)["reason"]
    points = [{"run": f"r{i}", "C": float(c), "results": {"t": {"accuracy": float(a), "chance": 0.25, "ci_low": a - 0.05,
                                                                   "ci_high": a + 0.05, "above_chance": a - 0.05 > 0.25}}}
              for i, (c, a) in enumerate(zip(C, acc))]
    fits = fit_sweep(points, target_C=1e16)
    assert fits["t"]["predicted"] == pytest.approx(predict(fit, 1e16, 0.25), rel=1e-3)
    md = save_prediction(tmp_path, points, fits)
    assert (tmp_path / "task_prediction.png").stat().st_size > 1000 and "| t | 25% |" in md.read_text()
    assert json.loads((tmp_path / "task_prediction.json").read_text())["fits"]["t"]["fit"]["b"] == pytest.approx(2.2, rel=1e-3)


def test_eval_verb_task_list_and_errors(capsys, tmp_path):
    from steplab.cli import main

    assert main(["eval", "x", "--task", "list"]) == 0
    assert "next_line" in capsys.readouterr().out
    assert main(["eval", str(tmp_path), "--task", "next_line"]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_suite_over_sweep_scores_saves_and_says_when_it_cannot_fit(tmp_path, monkeypatch):
    import shutil

    from serve_fixtures import tiny_run
    from steplab.eval import suite as suite_mod
    from steplab.eval.taskfit import suite_over_sweep

    monkeypatch.setitem(suite_mod.SUITES, "tiny", [("line_order", 20)])
    run = tmp_path / "run"
    shutil.copytree(tiny_run(), run)
    md = suite_over_sweep([run], run, tmp_path, suite="tiny", progress=False)
    assert "| line_order | choice | 20 |" in md and "only 1 runs (need >= 3)" in md
    assert (tmp_path / "task_prediction.png").is_file() and (run / "eval" / "suite_tiny.json").is_file()
