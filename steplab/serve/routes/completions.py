"""``POST /v1/completions``: text in, text out. A text prompt is plain text (never control tokens) after <|bos|>.

As vLLM serves it for lm-evaluation-harness: ``prompt`` may be a batch (a list of strings or of token-id lists;
choice ``i * n + j`` is choice j of prompt i), ``echo`` returns the prompt before the completion and, with
``logprobs``, scores the prompt's tokens too (the first one has no context: null), and ``max_tokens: 0`` with
``echo`` scores without generating. Token-id prompts are the one place a client picks ids itself: they must lie
below the vocabulary size and are used exactly as given (no <|bos|> is added).
"""
from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import Request as HTTPRequest
from fastapi import APIRouter
from fastapi.responses import Response

from steplab.serve.common import COMPLETIONS_MAX_TOKENS, engine_for, guard, parse, state, submit
from steplab.serve.errors import APIError
from steplab.serve.responses import _watch_disconnect, logprobs_json, respond
from steplab.serve.schema import CompletionRequest, openapi_body

router = APIRouter()

MAX_BATCH_TOKENS = 65_536  # prompts x n x max_tokens per request; past it: 413 (split the batch)


@router.post("/v1/completions", summary="Create a text completion", openapi_extra=openapi_body(CompletionRequest))
async def completions(request: HTTPRequest):
    guard(request)
    body = await parse(request, CompletionRequest)
    engine = engine_for(request, body.model)
    prompts = _prompts(body.prompt)
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens=0 is only allowed with echo=true (scoring the prompt)", param="max_tokens")
    n = body.n or 1
    max_tokens = COMPLETIONS_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if len(prompts) > engine.max_queue:
        raise APIError(413, f"{len(prompts)} prompts in one request; this server takes at most {engine.max_queue}: "
                       "split the batch", param="prompt", code="batch_too_large")
    if len(prompts) * n * max_tokens > MAX_BATCH_TOKENS:
        raise APIError(413, f"prompts x n x max_tokens = {len(prompts)} x {n} x {max_tokens} exceeds this server's "
                       f"{MAX_BATCH_TOKENS} per request; split the batch or lower max_tokens", param="prompt",
                       code="batch_too_large")
    tok = engine.tokenizer
    ids = [[tok.bos_id] + tok.encode(p) if isinstance(p, str) else p for p in prompts]
    if len(prompts) == 1 and not body.echo:  # the plain case, streaming included
        handle = submit(engine, body, ids[0], frozenset({tok.eos_id}), body.logprobs, "prompt",
                        default_max_tokens=COMPLETIONS_MAX_TOKENS)
        return await respond(request, "text", body, handle)
    if body.stream:
        raise APIError(400, "stream is not supported with echo or with several prompts; send stream=false",
                       param="stream")
    scoring = body.logprobs if body.echo else None
    handles = []
    try:
        for p in ids:
            handles.append(submit(engine, body, p, frozenset({tok.eos_id}), body.logprobs, "prompt",
                                  default_max_tokens=COMPLETIONS_MAX_TOKENS,
                                  prompt_logprobs=(scoring or 0) if body.echo else None))
    except APIError:
        for h in handles:
            h.cancel()
        raise
    return await _batch_response(request, body, prompts, handles)


def _prompts(prompt) -> list:
    """The request's prompts: each a string or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt[0], int):
        return [prompt]
    if any(isinstance(p, list) and not p for p in prompt):
        raise APIError(400, "a token-id prompt must not be empty", param="prompt")
    return list(prompt)


async def _batch_response(request: HTTPRequest, body, prompts: list, handles: list) -> dict | Response:
    st = state(request)
    n = body.n or 1
    tab = st.table(body.model) if body.logprobs is not None else None
    watchers = [asyncio.ensure_future(_watch_disconnect(request, h)) for h in handles]
    results = []
    try:
        for h in handles:
            choices = [{"text": [], "tokens": [], "logprobs": [], "prompt_logprobs": None, "finish": None} for _ in range(n)]
            async for ev in h:
                c = choices[ev.index]
                if ev.error:
                    raise APIError(500, ev.error, type="server_error")
                c["text"].append(ev.text)
                c["tokens"] += ev.tokens
                c["logprobs"] += ev.logprobs
                if ev.prompt_logprobs is not None:
                    c["prompt_logprobs"] = ev.prompt_logprobs
                if ev.finish_reason:
                    c["finish"] = ev.finish_reason
            results.append(choices)
    except BaseException:
        for h in handles:  # one prompt failed or the handler was cancelled: free every slot of the batch
            h.cancel()
        raise
    finally:
        for w in watchers:
            w.cancel()
    if any(h.cancelled for h in handles):
        return Response(status_code=499)
    head = {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion", "created": int(time.time()),
            "model": body.model, "system_fingerprint": "fp_steplab"}
    tok = handles[0]._engine.tokenizer
    out = []
    for i, (prompt, h, choices) in enumerate(zip(prompts, handles, results)):
        echo = (prompt if isinstance(prompt, str) else tok.decode(prompt)) if body.echo else ""
        for j, c in enumerate(choices):
            text = echo + "".join(c["text"])
            lp = None
            if tab is not None:
                lp = logprobs_json(tab, "text", c["logprobs"], len(echo))
                if body.echo:
                    lp = _with_prompt(tab, tok, h.request.prompt, c["prompt_logprobs"], lp)
            choice = {"index": i * n + j, "text": text, "logprobs": lp, "finish_reason": c["finish"]}
            if body.return_token_ids:
                choice["token_ids"] = c["tokens"]
                choice["prompt_token_ids"] = h.request.prompt
            out.append(choice)
    prompt_tokens = sum(h.prompt_tokens for h in handles)
    completion_tokens = sum(h.completion_tokens for h in handles)
    return {**head, "choices": out, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                              "total_tokens": prompt_tokens + completion_tokens}}


def _with_prompt(tab: list, tok, prompt: list[int], scored: list, completion: dict) -> dict:
    """The prompt's tokens before the completion's: the first has no context (null logprob and top_logprobs).
    Offsets index the echoed text, where special tokens (the <|bos|> before a text prompt) take no characters."""
    specials = set(tok.special_ids.values())
    offsets, pos = [], 0
    for t in prompt:
        offsets.append(pos)
        pos += 0 if t in specials else len(tab[t][0])
    return {"tokens": [tab[t][0] for t in prompt] + completion["tokens"],
            "token_logprobs": [None if e is None else e.logprob for e in scored] + completion["token_logprobs"],
            "top_logprobs": [None if e is None else {tab[t][0]: lp for t, lp in e.top} for e in scored]
                            + completion["top_logprobs"],
            "text_offset": offsets + completion["text_offset"]}
