"""Test-time scaling: pass@k estimator, majority vote, best-of-N, the verifier and `steplab eval --samples`."""
from __future__ import annotations

import json
import math

import pytest

from steplab.eval.tts import best_of_correct, majority_correct, pass_at_k, scaling_table
from rl_fixtures import countdown_run  # noqa: F401  (a fixture)


def test_pass_at_k_unbiased():
    assert pass_at_k(10, 0, 1) == 0 and pass_at_k(10, 10, 5) == 1
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - math.comb(7, 2) / math.comb(10, 2))
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(5, 1, 4) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def a(key, correct, well=True):
    return {"key": key, "correct": correct, "well_formed": well}


def test_majority_and_best_of():
    assert majority_correct([a("7", False), a("5", True), a("5", True)])
    assert not majority_correct([a("7", False), a("7", False), a("5", True)])
    assert not majority_correct([a("7", False), a("5", True)])  # a tie goes to the answer seen first
    assert not majority_correct([a(None, False), a(None, False)])
    assert majority_correct([a(None, False), a(None, False), a("5", True)])  # unreadable answers do not vote
    assert best_of_correct([a("7", False), a("5", True)], [0.2, 0.9])
    assert not best_of_correct([a("7", False), a("5", True)], [0.9, 0.2])


def test_scaling_table():
    graded = [[a("1", True), a("2", False), a("2", False), a("1", True)],
              [a("3", False), a("4", False), a("5", True), a("3", False)]]
    t = scaling_table(graded, scores=[[0.1, 0.9, 0.2, 0.3], [0.1, 0.2, 0.8, 0.3]], ks=(1, 2, 4))
    assert t["pass"][1] == pytest.approx((0.5 + 0.25) / 2)
    assert t["oracle"] == {1: 0.5, 2: 0.5, 4: 1.0}
    assert t["maj"][4] == 0.5  # problem 1: "1" and "2" tie 2-2, "1" came first (right); problem 2: "3" wins (wrong)
    assert t["verifier"][4] == 0.5  # problem 1 picks "2" (wrong), problem 2 picks "5" (right)


def test_tts_and_verifier_end_to_end(countdown_run, tmp_path):
    from steplab.cli import main
    from steplab.eval.verifier import load_verifier

    assert main(["rl", "--from", str(countdown_run), "--task", "countdown3", "--train-verifier", "--out",
                 str(tmp_path / "orm"), "--train-items", "12", "--group-size", "4"]) == 0
    orm, info = load_verifier(tmp_path / "orm")
    assert info["samples"] == 48
    assert main(["eval", str(countdown_run), "--task", "countdown3", "--samples", "4", "-n", "6", "--vote", "best-of",
                 "--verifier", str(tmp_path / "orm")]) == 0
    res = json.loads((countdown_run / "tts_countdown3.json").read_text())
    t = res["table"]
    assert res["items"] == 6 and set(t["pass"]) == {"1", "2", "4"}
    assert t["oracle"]["4"] >= t["pass"]["4"] - 1e-9 and t["oracle"]["4"] >= t["verifier"]["4"]
    assert (countdown_run / "tts_countdown3.png").stat().st_size > 1000
    assert main(["eval", str(countdown_run), "--task", "countdown3", "--samples", "2", "--vote", "best-of"]) == 2
