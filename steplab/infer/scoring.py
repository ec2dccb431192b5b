"""How the engine scores at eval speed: score-only requests (``max_tokens`` 0 with ``prompt_logprobs``) in batches.

A task eval sends hundreds of short scoring requests; prefilled one at a time, each costs a forward of its own.
Each engine turn (:meth:`steplab.infer.engine.Engine._step`) first hands the head of its prefill queue to
:func:`score_step`, which runs, within the turn's token budget:

- whole prompts: as many score-only requests as fit, right-padded into ONE forward without the KV cache (they
  generate nothing). Under causal attention a row's padding never reaches its real positions, so each row's
  logprobs are those of its own prefill, up to float rounding;
- requests with ``continuations`` (the choices of a multiple-choice item): their prompts in one padded forward
  into their first slots, each prompt's cache copied to its other slots, then every continuation of every
  request in one padded forward over the cache. A prompt shared by four choices is computed once, not four
  times. Padding written into the cache past a row's real end is overwritten or never attended (the cache's
  mask lets a position see only positions up to its own).

Requests that do not qualify (generation, images, a prompt longer than the budget) take the ordinary prefill.
"""
from __future__ import annotations

import torch

from steplab.infer.engine import _score
from steplab.infer.requests import ContextLengthError, Event
from steplab.models.rope import is_dynamic


def score_step(engine, budget: int) -> int:
    """Score the qualifying requests at the head of ``engine``'s prefill queue; returns the padded tokens used."""
    if not engine._prefilling:
        return 0
    if engine._prefilling[0].handle.request.continuations:
        return _continuations(engine, budget)
    return _whole_prompts(engine, budget)


def _whole_prompts(engine, budget: int) -> int:
    group, width = [], 0
    for pre in engine._prefilling:
        req = pre.handle.request
        w = max(width, len(req.prompt))
        if (req.max_tokens != 0 or req.prompt_logprobs is None or req.images is not None or req.continuations
                or pre.pos or w * (len(group) + 1) > budget or not pads_safely(engine, w)):
            break
        group.append(pre)
        width = w
    if len(group) < 2:  # one request alone: the ordinary prefill (bit-identical to an unbatched engine)
        return 0
    logits = engine.model(_padded([pre.handle.request.prompt for pre in group], engine.device))
    for row, pre in enumerate(group):
        req = pre.handle.request
        pre.prompt_logprobs += _score(logits[row, :len(req.prompt) - 1], req.prompt[1:], req.prompt_logprobs)
        _deliver(engine, pre, [pre.prompt_logprobs] * len(pre.seqs))
    return width * len(group)


def _continuations(engine, budget: int) -> int:
    """Requests with continuations at the head of the queue (at least one, so the queue always moves)."""
    group, p_width, c_width, rows = [], 0, 0, 0
    for pre in engine._prefilling:
        req = pre.handle.request
        if not req.continuations or pre.pos:
            break
        pw, cw = max(p_width, len(req.prompt)), max(c_width, max(len(c) for c in req.continuations))
        longest_prompt = max([len(req.prompt)] + [len(p.handle.request.prompt) for p in group])
        if group and ((len(group) + 1) * pw + (rows + len(req.continuations)) * cw > budget
                      or longest_prompt + cw > engine.context_len):  # every row's positions stay in the cache
            break
        group.append(pre)
        p_width, c_width, rows = pw, cw, rows + len(req.continuations)
    cache = engine.cache
    first = torch.tensor([pre.seqs[0].slot for pre in group], device=engine.device)
    cache.lengths[first] = 0
    p_logits = engine.model(_padded([pre.handle.request.prompt for pre in group], engine.device), cache=cache, slots=first)
    slots, conts = [], []
    for pre in group:
        n_prompt = len(pre.handle.request.prompt)
        cache.lengths[pre.seqs[0].slot] = n_prompt  # the padding past the prompt is not part of it
        for seq in pre.seqs[1:]:
            engine._copy_slot(pre.seqs[0].slot, seq.slot, n_prompt)
        slots += [seq.slot for seq in pre.seqs]
        conts += [list(c) for c in pre.handle.request.continuations]
    c_logits = engine.model(_padded(conts, engine.device), cache=cache, slots=torch.tensor(slots, device=engine.device))
    row = 0
    for i, pre in enumerate(group):
        req = pre.handle.request
        last = p_logits[i, len(req.prompt) - 1:len(req.prompt)]  # predicts each continuation's first token
        scored = []
        for cont in req.continuations:
            rows_logits = torch.cat([last, c_logits[row, :len(cont) - 1]])
            scored.append(_score(rows_logits, list(cont), req.prompt_logprobs))
            row += 1
        _deliver(engine, pre, scored)
    return len(group) * p_width + rows * c_width


def _padded(seqs: list[list[int]], device) -> torch.Tensor:
    ids = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long, device=device)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s, device=device)
    return ids


def _deliver(engine, pre, prompt_logprobs: list) -> None:
    """The request leaves the prefill queue and frees its slots (one move under the lock), then each choice gets
    its final event with its logprobs."""
    with engine._cond:
        engine._prefilling.remove(pre)
        engine.prompt_tokens_total += len(pre.handle.request.prompt) + sum(map(len, pre.handle.request.continuations))
        for seq in pre.seqs:
            engine._finish(seq, "length", running=False, deliver=False)
    for seq, lps in zip(pre.seqs, prompt_logprobs):
        seq.handle._deliver(Event(seq.index, [], "", finish_reason="length", prompt_logprobs=lps))


def check_continuations(engine, request, n_prompt: int) -> None:
    """A scoring request with continuations is well formed (ValueError / ContextLengthError otherwise)."""
    if request.max_tokens != 0 or request.prompt_logprobs is None or request.images is not None:
        raise ValueError("continuations are scored only: need max_tokens 0, prompt_logprobs and no images")
    if request.n != len(request.continuations) or not all(request.continuations):
        raise ValueError(f"n={request.n} must equal the number of continuations ({len(request.continuations)}), "
                         "each with at least one token")
    longest = n_prompt + max(len(c) for c in request.continuations)
    if longest > engine.context_len:
        raise ContextLengthError(f"this model's maximum context length is {engine.context_len} tokens, but the prompt "
                                 f"and its longest continuation have {longest}; shorten them")
    if any(not 0 <= t < engine.vocab_size for c in request.continuations for t in c):
        raise ValueError(f"continuation token ids must lie in [0, {engine.vocab_size})")


def pads_safely(engine, width: int) -> bool:
    """Whether a padded batch of prompts up to ``width`` tokens gives each row its own prefill's logits: not with
    document masking (a cache-free forward masks inside the prompt) nor with a dynamic RoPE past its original
    length (its frequencies would follow the padded width)."""
    cfg, rope = engine.model.cfg, getattr(engine.model, "rope", None)
    if getattr(cfg, "doc_mask_token", -1) >= 0:
        return False
    return not (is_dynamic(rope) and width > rope.original_max_seq_len)
