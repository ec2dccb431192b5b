"""Scoring at eval speed: the engine scores many score-only prompts in one padded forward (same logprobs as a
full forward of each), and a suite over many runs builds each task's items once."""
from __future__ import annotations

import threading

import pytest

from serve_fixtures import tiny_run

from steplab.infer.engine import Engine, Request


@pytest.fixture(scope="module")
def loaded():
    import torch

    from steplab.train.checkpoint import load_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _, model, tokenizer, _ = load_run(tiny_run())
    yield model, tokenizer
    torch.set_num_threads(threads)


def _reference_logprobs(model, ids):
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)
    return [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]


def test_engine_scores_many_prompts_per_forward_and_each_equals_its_full_forward(loaded):
    model, tok = loaded
    texts = [f"def f{i}(x):\n    return x{' + 1' * i}\n" for i in range(12)]
    prompts = [[tok.bos_id] + tok.encode(t) for t in texts]
    assert len({len(p) for p in prompts}) > 3  # different lengths: the batch is padded
    gate = threading.Event()
    prefills = []  # forward calls over more than one position: prompt prefills (a decode step feeds one)
    hook = model.register_forward_hook(lambda m, args, out: prefills.append(args[0].shape) if args[0].shape[1] > 1 else None)
    with Engine(model, tok, max_batch=8, max_queue=64, prefill_chunk=4096) as engine:
        engine.before_step = gate.wait  # hold the engine until every request is queued
        handles = [engine.submit(Request(p, max_tokens=0, prompt_logprobs=1)) for p in prompts]
        gen = engine.submit(Request(prompts[0], max_tokens=4, temperature=0.0))  # a generation request among them
        gate.set()
        outs = []
        for h in handles:
            events = list(h)
            assert events[-1].finish_reason == "length" and events[-1].tokens == []
            outs.append(events[-1].prompt_logprobs)
        gen_tokens = [t for ev in gen for t in ev.tokens]
    hook.remove()
    # one padded forward per group of up to max_batch prompts (+ the generation's prefill), not one per prompt
    assert len(prefills) <= 4 and max(shape[0] for shape in prefills) > 1, prefills
    for p, lps in zip(prompts, outs):
        assert lps[0] is None and [e.token for e in lps[1:]] == p[1:]
        assert [e.logprob for e in lps[1:]] == pytest.approx(_reference_logprobs(model, p), abs=1e-4)
        assert all(e.top[0][1] >= e.logprob - 1e-6 for e in lps[1:])
    from steplab.infer.sampling import SamplingParams, generate

    assert gen_tokens == generate(model, [prompts[0]], SamplingParams(max_new_tokens=4, temperature=0.0))[0]


def test_continuations_share_their_prompt_and_equal_full_forwards(loaded):
    """Choices of several items as requests with continuations, next to whole-prompt and generation requests in
    one queue: every continuation's logprobs equal a full forward of prompt + continuation, and each prompt is
    computed once (the forwards cover far fewer positions than the pairs)."""
    model, tok = loaded
    items = [("def area(r):\n    return", [" 3.14 * r * r\n", " r\n", " None\n"]),
             ("import os\nimport", [" sys\n", " re\n"]),
             ("class Point:\n    def __init__(self, x, y):\n        self.x =", [" x\n", " y\n", " 0\n", " self\n"])]
    reqs = [([tok.bos_id] + tok.encode(p), [tok.encode(c) for c in cs]) for p, cs in items]
    gate = threading.Event()
    positions = []
    hook = model.register_forward_hook(lambda m, args, out: positions.append(args[0].numel()))
    with Engine(model, tok, max_batch=8, max_queue=64, prefill_chunk=4096) as engine:
        engine.before_step = gate.wait
        whole = engine.submit(Request(reqs[1][0] + reqs[1][1][0], max_tokens=0, prompt_logprobs=1))
        handles = [engine.submit(Request(p, max_tokens=0, prompt_logprobs=1, n=len(cs), continuations=tuple(map(tuple, cs))))
                   for p, cs in reqs]
        gen = engine.submit(Request(reqs[0][0], max_tokens=3, temperature=0.0))
        with pytest.raises(ValueError, match="continuations"):
            engine.submit(Request(reqs[0][0], max_tokens=2, n=1, continuations=((5,),)))
        with pytest.raises(ValueError, match="must equal the number of continuations"):
            engine.submit(Request(reqs[0][0], max_tokens=0, prompt_logprobs=1, n=2, continuations=((5,),)))
        gate.set()
        results = [{ev.index: ev.prompt_logprobs for ev in h} for h in handles]
        whole_lps = [ev.prompt_logprobs for ev in whole][-1]
        assert len([t for ev in gen for t in ev.tokens]) == 3
    hook.remove()
    for (prompt, conts), got in zip(reqs, results):
        for i, cont in enumerate(conts):
            ref = _reference_logprobs(model, prompt + cont)[len(prompt) - 1:]
            assert [e.token for e in got[i]] == cont
            assert [e.logprob for e in got[i]] == pytest.approx(ref, abs=1e-4)
    assert [e.logprob for e in whole_lps[1:]] == pytest.approx(_reference_logprobs(model, reqs[1][0] + reqs[1][1][0]), abs=1e-4)
    pairs_positions = sum(len(p) + len(c) for p, cs in reqs for c in cs)
    scored = sum(positions) - 3 * len(reqs[0][0])  # less the generation's prefill and decode steps, at most
    assert scored < pairs_positions, (scored, pairs_positions)


def test_suite_builds_each_tasks_items_once_for_many_runs(loaded, monkeypatch):
    from steplab.eval import suite as suite_mod
    from steplab.eval.runner import EngineLM
    from steplab.tasks.line_order import LineOrder

    model, tok = loaded
    calls = []
    original = LineOrder.items
    monkeypatch.setattr(LineOrder, "items", lambda self, *a, **k: calls.append(a) or original(self, *a, **k))
    monkeypatch.setitem(suite_mod.SUITES, "tiny", [("line_order", 20)])
    suite_mod.task_items.cache_clear()
    with EngineLM(model, tok, max_batch=8) as lm:
        first = suite_mod.run_suite(lm, "tiny", seed=3)
        second = suite_mod.run_suite(lm, "tiny", seed=3)
    suite_mod.task_items.cache_clear()
    assert len(calls) == 1
    assert first["results"][0]["n"] == 20 and first["results"][0]["correct"] == second["results"][0]["correct"]
