"""Rollouts through the serving engine (``steplab.infer.engine``: the same continuous batching ``steplab serve``
uses; no second sampler), in process or on Ray actors, plus the rule-based reward.

Each problem of a rollout batch is one engine request with ``n = group_size`` choices, its own seed
(``seed`` + choice index inside the engine), temperature 1 by default, and ``logprobs=0`` so the engine reports
the log-probability of every sampled token. Before each rollout the engine's copy of the policy receives the
latest weights (:meth:`Engine.load_weights`). With :class:`RayRollouts` every worker actor holds its own engine
and gets the weights through the Ray object store each step; problems are dealt out in contiguous chunks, so
the samples are the same as in process for a fixed seed.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from steplab.eval.sampling import grade_answer
from steplab.infer.engine import Engine, Request
from steplab.rl.policy import Sample


@dataclass
class Job:
    item: int
    group: int
    prompt: list[int]
    seed: int


@dataclass
class SamplingSpec:
    n: int
    max_tokens: int
    temperature: float = 1.0
    stop: tuple[str, ...] = ("\n",)


class LocalRollouts:
    """An engine over a private copy of the policy."""

    def __init__(self, policy: torch.nn.Module, tokenizer, max_batch: int = 64):
        self.tokenizer = tokenizer
        self.engine = Engine(copy.deepcopy(policy).eval(), tokenizer, name="rollout", max_batch=max_batch,
                             max_queue=1 << 30).start()

    def run(self, weights: dict[str, torch.Tensor] | None, jobs: list[Job], spec: SamplingSpec) -> list[Sample]:
        if weights is not None:
            self.engine.load_weights(weights)
        stop_ids = frozenset({self.tokenizer.eos_id})
        handles = [self.engine.submit(Request(prompt=j.prompt, max_tokens=spec.max_tokens, temperature=spec.temperature,
                                              seed=j.seed, logprobs=0, stop=spec.stop, stop_ids=stop_ids, n=spec.n))
                   for j in jobs]
        out = []
        for job, handle in zip(jobs, handles):
            for c in self.engine_results(handle, spec.n):
                out.append(Sample(job.item, job.group, job.prompt, c["tokens"], c["logprobs"], c["finish"], c["text"]))
        return out

    @staticmethod
    def engine_results(handle, n: int) -> list[dict]:
        res = [{"tokens": [], "logprobs": [], "text": "", "finish": ""} for _ in range(n)]
        for ev in handle:
            if ev.error:
                raise RuntimeError(f"rollout failed: {ev.error}")
            r = res[ev.index]
            r["tokens"] += ev.tokens
            r["logprobs"] += [lp.logprob for lp in ev.logprobs]
            r["text"] += ev.text
            if ev.finish_reason:
                r["finish"] = ev.finish_reason
        return res

    def close(self) -> None:
        self.engine.stop()


class RayRollouts:
    """``--launcher ray``: ``workers`` Ray actors, each a :class:`LocalRollouts`; connects to a running Ray
    cluster when one is configured (``RAY_ADDRESS``), else starts a local instance."""

    def __init__(self, policy: torch.nn.Module, tokenizer, workers: int = 2, max_batch: int = 64):
        import ray

        if not ray.is_initialized():
            ray.init(num_cpus=max(workers, 1), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        actor = ray.remote(num_cpus=1)(_RolloutWorker)
        self._ray = ray
        self.workers = [actor.remote(copy.deepcopy(policy).cpu(), tokenizer, max_batch) for _ in range(workers)]

    def run(self, weights, jobs: list[Job], spec: SamplingSpec) -> list[Sample]:
        ray = self._ray
        ref = ray.put(weights) if weights is not None else None
        size = -(-len(jobs) // len(self.workers))
        futures = [w.run.remote(ref, jobs[i * size:(i + 1) * size], spec) for i, w in enumerate(self.workers)
                   if jobs[i * size:(i + 1) * size]]
        return [s for part in ray.get(futures) for s in part]

    def close(self) -> None:
        for w in self.workers:
            self._ray.kill(w)


class _RolloutWorker:
    def __init__(self, policy, tokenizer, max_batch: int):
        torch.set_num_threads(1)
        self.local = LocalRollouts(policy, tokenizer, max_batch)

    def run(self, weights, jobs, spec):
        return self.local.run(weights, jobs, spec)


def grade(task, item, sample: Sample) -> None:
    """ORZ's binary rule-based reward: 1 only when the answer is right and the generation ended normally (a stop
    string or end of text); a truncated answer gets 0. ``well_formed`` = parsable answer that ended normally.
    The same grading as test-time scaling (``steplab.eval.sampling.grade_answer``)."""
    g = grade_answer(task, item, sample.text, sample.finish_reason)
    sample.correct, sample.well_formed = g["correct"], g["well_formed"]
    sample.reward = 1.0 if sample.correct else 0.0
