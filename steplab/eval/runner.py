"""A model behind the serving engine, as evaluation sees it: score continuations, generate greedily.

Everything goes through :class:`steplab.infer.engine.Engine` (the one the API serves with): scoring submits
the whole sequence with ``prompt_logprobs`` and ``max_tokens=0``; generation is greedy with stop strings. So
the task evals, the in-process lm-evaluation-harness adapter and ``/v1/completions`` compute the same numbers.
All requests are submitted at once and the engine batches them (continuous batching).
"""
from __future__ import annotations

from pathlib import Path

from steplab.infer.engine import Engine, Request
from steplab.infer.scoring import pads_safely


class EngineLM:
    def __init__(self, model, tokenizer, *, max_batch: int = 16, name: str = "eval", prefill_chunk: int = 4096):
        self.tokenizer = tokenizer
        # a large prefill budget: the engine scores up to max_batch whole prompts in one padded forward per turn
        self.engine = Engine(model, tokenizer, name=name, max_batch=max_batch, max_queue=1 << 30,
                             prefill_chunk=prefill_chunk).start()
        self.context_len = self.engine.context_len

    @classmethod
    def from_run(cls, run: str | Path, device: str = "auto", dtype: str = "fp32", checkpoint: str | Path | None = None,
                 **kw) -> "EngineLM":
        import torch

        from steplab.train.checkpoint import load_run
        from steplab.train.trainer import resolve_device

        _, model, tokenizer, _ = load_run(run, device=resolve_device(device), checkpoint=checkpoint)
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype {dtype!r} must be fp32 or bf16")
        model = model.to(torch.bfloat16 if dtype == "bf16" else torch.float32)
        return cls(model, tokenizer, name=Path(run).name, **kw)

    def close(self) -> None:
        self.engine.stop()

    def __enter__(self) -> "EngineLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def loglikelihood(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """For each (context ids, continuation ids): the continuation's summed logprob and whether it is the
        greedy continuation. The context is cut from the left when the pair exceeds the model's context.
        Pairs that share a context (the choices of one item) go as one request with ``continuations``, so the
        engine computes the context once (steplab.infer.scoring); the rest go whole, longest first, so the
        engine's padded batches hold sequences of similar length."""
        if any(not ctx or not cont for ctx, cont in pairs):
            raise ValueError("loglikelihood needs a non-empty context and continuation")
        shared: dict[tuple[int, ...], list[int]] = {}
        whole: list[int] = []
        for i, (ctx, cont) in enumerate(pairs):
            fits = len(ctx) + len(cont) <= self.context_len and pads_safely(self.engine, self.context_len)
            (shared.setdefault(tuple(ctx), []) if fits else whole).append(i)
        jobs: list[tuple[list[int], object]] = []  # (pair indices, handle) in the order they were submitted
        for ctx in sorted(shared, key=len, reverse=True):
            idx = shared[ctx]
            for k in range(0, len(idx), self.engine.max_batch):
                part = idx[k:k + self.engine.max_batch]
                req = Request(prompt=list(ctx), max_tokens=0, prompt_logprobs=1, temperature=0.0, n=len(part),
                              continuations=tuple(tuple(pairs[i][1]) for i in part))
                jobs.append((part, self.engine.submit(req)))
        for i in sorted(whole, key=lambda i: -len(pairs[i][0]) - len(pairs[i][1])):
            ids = (pairs[i][0] + pairs[i][1])[-self.context_len:]
            jobs.append(([i], self.engine.submit(Request(prompt=ids, max_tokens=0, prompt_logprobs=1, temperature=0.0))))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for part, handle in jobs:
            scored: dict[int, list] = {}
            for ev in handle:
                if ev.error:
                    raise RuntimeError(ev.error)
                if ev.prompt_logprobs is not None:
                    scored[ev.index] = ev.prompt_logprobs[-len(pairs[part[ev.index]][1]):]
            for j, i in enumerate(part):
                out[i] = (sum(lp.logprob for lp in scored[j]), all(lp.top[0][0] == lp.token for lp in scored[j]))
        return out

    def generate(self, prompts: list[list[int]], max_tokens: int, stop: tuple[str, ...] = ()) -> list[str]:
        """Greedy completions (text up to the first stop string or end of text)."""
        handles = []
        for ids in prompts:
            ids = ids[-(self.context_len - max_tokens):]
            handles.append(self.engine.submit(Request(prompt=ids, max_tokens=max_tokens, temperature=0.0,
                                                      stop=tuple(stop), stop_ids=frozenset({self.tokenizer.eos_id}))))
        out = []
        for handle in handles:
            text = ""
            for ev in handle:
                if ev.error:
                    raise RuntimeError(ev.error)
                text += ev.text
            out.append(text)
        return out

    def chat(self, prompts: list[list[int]], max_tokens: int, stop_ids: frozenset[int]) -> list[tuple[str, list[int], str]]:
        """Greedy replies to chat prompts (``steplab.data.chat.prompt_ids``): (text, token ids with the stop token
        that ended it, finish reason) each; a prompt is never cut (the engine refuses one that does not fit)."""
        handles = [self.engine.submit(Request(prompt=ids, max_tokens=min(max_tokens, self.context_len - len(ids)),
                                              temperature=0.0, stop_ids=stop_ids)) for ids in prompts]
        out = []
        for handle in handles:
            text, tokens, finish = "", [], ""
            for ev in handle:
                if ev.error:
                    raise RuntimeError(ev.error)
                text += ev.text
                tokens += ev.tokens
                finish = ev.finish_reason or finish
            out.append((text, tokens, finish))
        return out
