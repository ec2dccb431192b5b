"""``POST /v1/completions``: text in, text out. A text prompt is plain text (never control tokens) after <|bos|>."""
from __future__ import annotations

from fastapi import APIRouter, Request as HTTPRequest

from steplab.serve.common import COMPLETIONS_MAX_TOKENS, engine_for, guard, parse, submit
from steplab.serve.errors import APIError
from steplab.serve.responses import respond
from steplab.serve.schema import CompletionRequest, openapi_body

router = APIRouter()


@router.post("/v1/completions", summary="Create a text completion", openapi_extra=openapi_body(CompletionRequest))
async def completions(request: HTTPRequest):
    guard(request)
    body = await parse(request, CompletionRequest)
    engine = engine_for(request, body.model)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"one prompt per request (got {len(prompt)}); send them as separate requests", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        prompt = [engine.tokenizer.bos_id] + engine.tokenizer.encode(prompt)
    handle = submit(engine, body, list(prompt), frozenset({engine.tokenizer.eos_id}), body.logprobs, "prompt",
                    default_max_tokens=COMPLETIONS_MAX_TOKENS)
    return await respond(request, "text", body, handle)
