"""Best-of-k TTS with the model's own ASR as the verifier: the selection rule, nested candidate seeds, the own-ASR
verifier being exactly the ASR path, and the bounded `candidates` option of `/v1/audio/speech` and `steplab eval`.

Assertions are on values the rule determines (which candidate a verifier hook accepts, what the ASR path says),
never on what the tiny model happens to sample."""
from __future__ import annotations

import numpy as np
import pytest

from steplab.eval.speech import candidate_seed, normalise, select_candidate


def test_selection_prefers_accepted_then_confidence_then_the_earlier():
    assert select_candidate([False, True, False], [-0.1, -5.0, -0.2]) == 1  # accepted beats a likelier reject
    assert select_candidate([True, True, False], [-2.0, -0.5, 0.0]) == 1  # the most confident accepted one
    assert select_candidate([False, False, False], [-3.0, -1.0, -2.0]) == 1  # none accepted: the likeliest
    assert select_candidate([True, True], [-1.0, -1.0]) == 0  # ties: the first
    assert select_candidate([False, False], [float("-inf"), float("-inf")]) == 0  # unverifiable: the first
    assert candidate_seed(7, 0) == 7 and len({candidate_seed(s, j) for s in range(10) for j in range(8)}) == 80


@pytest.fixture(scope="module")
def sm():
    from steplab.data.speech import espeak_available

    if not espeak_available():
        pytest.skip("espeak-ng is not installed (run `make speech`)")
    import torch

    from speech_fixtures import tiny_speech_run
    from steplab.eval.speech import SpeechModel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run, _ = tiny_speech_run()
    m = SpeechModel.from_run(run, device="cpu")
    m.run = run
    yield m
    torch.set_num_threads(threads)


def test_best_of_k_returns_the_candidate_the_verifier_accepts(sm):
    texts = ["one", "two"]
    cands = [sm.sample_speech(texts, seed=candidate_seed(5, j)) for j in range(3)]
    calls = []

    def hook(wavs, asked, seed):  # accepts only candidate 2 of "one"; for "two" nothing, but candidate 1 is likeliest
        j = len(calls)  # candidates are verified in order, one round per candidate
        assert asked == texts and seed == candidate_seed(5, j)
        assert all(np.array_equal(w, c) for w, c in zip(wavs, cands[j]))
        calls.append(len(wavs))
        return [("one", j == 2, -1.0), ("six", False, [-3.0, -0.5, -2.0][j])]

    got = sm.speak_best(texts, 3, seed=5, verify=hook)
    assert calls == [2, 2, 2]  # one verifier call per candidate round, every text in the batch
    assert [u.chosen for u in got] == [2, 1]
    assert np.array_equal(got[0].wav, cands[2][0]) and np.array_equal(got[1].wav, cands[1][1])
    assert got[0].accepted == [False, False, True] and got[1].accepted == [False, False, False]
    # candidate 0 is plain sampling with the request's seed: k = 1 is unchanged, and k is nested
    one = sm.speak(texts, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(one, cands[0]))
    assert all(np.array_equal(a, b) for a, b in zip(sm.speak(texts, seed=5, candidates=1), one))
    assert [u.chosen for u in sm.speak_best(texts, 1, seed=5, verify=hook)] == [0, 0] and calls == [2, 2, 2]
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        sm.speak_best(texts, 0)


def test_the_default_verifier_is_the_models_own_asr_path(sm):
    from steplab.data.speech import Clip, perturb

    texts = ["one", "three"]
    for renderings in (0, 2):
        got = sm.speak_best(texts, 2, seed=3, renderings=renderings)
        for j in range(2):
            wavs = sm.sample_speech(texts, seed=candidate_seed(3, j))
            rng = np.random.default_rng(candidate_seed(3, j))  # the renderings, recomputed from the rule
            views = [wavs] + [[perturb(Clip(w, "", "", 0), rng).wav for w in wavs] for _ in range(renderings)]
            heard = [sm.transcribe(v) for v in views]
            targets = [sm.vocab.text.encode(t) + [sm.vocab.text.eos_id] for t in texts]
            for i, u in enumerate(got):
                alone = [sm.continuation_logprob([sm.vocab.asr_prompt(v[i])], [targets[i]])[0] for v in views]  # unbatched
                assert u.transcripts[j] == heard[0][i]
                assert u.accepted[j] == all(normalise(h[i]) == texts[i] for h in heard)
                assert u.scores[j] == pytest.approx(sum(alone), abs=1e-3) and u.scores[j] <= 0.0
        for u in got:
            assert u.chosen == select_candidate(u.accepted, u.scores)
        wavs = [u.wav for u in got]
        assert all(np.array_equal(a, b) for a, b in zip(sm.speak(texts, seed=3, candidates=2, renderings=renderings), wavs))


def test_intelligibility_reports_nested_acceptance_and_cost(sm):
    from steplab.eval.speech import tts_intelligibility

    class Deaf:  # a judge that hears nothing: the score is 0 whatever is sampled
        def predict(self, wavs):
            return ["?"] * len(wavs)

    r = tts_intelligibility(sm, Deaf(), samples=1, words=["one", "two"], candidates=3)
    assert r["accuracy"] == 0.0 and r["n"] == 2 and r["candidates"] == 3 and r["seconds_per_utterance"] > 0
    acc = r["own_asr_accepted"]
    assert sorted(acc) == [1, 2, 3] and acc[1] <= acc[2] <= acc[3]
    assert r["verify_renderings"] == 0
    spoken = sm.speak_best(["one", "two"], 3, seed=0)
    assert acc[2] == np.mean([any(u.accepted[:2]) for u in spoken])


def test_eval_refuses_zero_candidates(sm, capsys):
    from steplab.cli import main

    with pytest.raises(SystemExit, match="--tts-candidates must be >= 1"):
        main(["eval", str(sm.run), "--task", "tts", "--tts-candidates", "0", "--device", "cpu"])
    with pytest.raises(SystemExit, match="--tts-renderings must be >= 0"):
        main(["eval", str(sm.run), "--task", "tts", "--tts-candidates", "2", "--tts-renderings", "-1", "--device", "cpu"])



def test_continuation_logprob_is_the_teacher_forced_sum(sm):
    import torch

    prompts = [[sm.vocab.text.bos_id, sm.vocab.open_id, 5, 6, sm.vocab.close_id], [sm.vocab.text.bos_id, sm.vocab.open_id]]
    targets = [[sm.vocab.text.encode("one")[0], sm.vocab.text.eos_id], [sm.vocab.text.eos_id]]
    got = sm.continuation_logprob(prompts, targets)
    for p, t, g in zip(prompts, targets, got):  # each sequence alone, unpadded, summed position by position
        with torch.no_grad():
            logp = sm.model(torch.tensor([p + t])).float().log_softmax(-1)[0]
        want = sum(float(logp[len(p) - 1 + j, tok]) for j, tok in enumerate(t))
        assert g == pytest.approx(want, abs=1e-4) and g < 0
