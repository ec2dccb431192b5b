"""What every route shares: the app's state, the auth/rate-limit guard, body parsing, engine lookup and submission."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from fastapi import Request as HTTPRequest
from pydantic import ValidationError

from steplab.infer.engine import ContextLengthError, Engine, EngineStoppedError, QueueFullError, Request
from steplab.serve.auth import KeyChecker, RateLimiter, bucket_name
from steplab.serve.errors import APIError, validation_error
from steplab.serve.metrics import Metrics
from steplab.serve.schema import ChatCompletionRequest

COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat defaults to the room left in the context)


@dataclass
class ServeState:
    engines: dict[str, Engine]
    metrics: Metrics
    checker: KeyChecker | None = None
    limiter: RateLimiter | None = None
    auth_failures: RateLimiter | None = None
    created: int = 0
    tables: dict[str, list] = field(default_factory=dict)
    in_flight: int = 0  # HTTP handlers running (kept by the Gate middleware)
    allow_remote_images: bool = False  # http(s) image URLs in chat requests (serve/media.py); off: 400
    videos: object = None  # serve/video_jobs.VideoService when video models are served (issue 21)

    def table(self, name: str) -> list:
        from steplab.serve.tokens import token_table

        if name not in self.tables:
            self.tables[name] = token_table(self.engines[name].tokenizer)
        return self.tables[name]


def state(request: HTTPRequest) -> ServeState:
    return request.app.state.serve


def client_address(request: HTTPRequest) -> str:
    """The peer address (rewritten from X-Forwarded-For only by the trusted-proxy middleware, when configured)."""
    return request.client.host if request.client else "?"


def guard(request: HTTPRequest) -> None:
    """Brute-force block, API key, rate limit, in that order; raises APIError 401/429."""
    st = state(request)
    address = client_address(request)
    bucket = "ip:" + address
    if st.checker is not None:
        if st.auth_failures is not None:
            wait = st.auth_failures.blocked(bucket)
            if wait:  # decided before the key is looked at: a blocked guesser learns nothing
                st.metrics.auth_blocked.inc()
                raise APIError(429, f"too many failed authentications from your address; retry in {wait:.0f} s",
                               type="rate_limit_exceeded", code="too_many_auth_failures",
                               headers={"Retry-After": RateLimiter.retry_after(wait)})
        header = request.headers.get("authorization")
        ok, reason = st.checker.check(header)
        if not ok:
            st.metrics.auth_failures.inc()
            if st.auth_failures is not None:
                st.auth_failures.hit(bucket)
            raise APIError(401, reason, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        bucket = bucket_name(KeyChecker.token(header)[0])
    if st.limiter is not None:
        wait = st.limiter.acquire(bucket)
        if wait:
            raise APIError(429, f"rate limit reached ({st.limiter.describe()}); retry in {wait:.1f} s",
                           type="rate_limit_exceeded", code="rate_limit_exceeded",
                           headers={"Retry-After": RateLimiter.retry_after(wait)})


async def parse(request: HTTPRequest, schema):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    try:
        body = schema.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
    name = body.unsupported()
    if name:
        raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    return body


def engine_for(request: HTTPRequest, name: str) -> Engine:
    engines = state(request).engines
    if name not in engines:
        raise APIError(404, f"the model '{name}' does not exist; available: {', '.join(sorted(engines))}",
                       param="model", code="model_not_found")
    return engines[name]


def submit(engine: Engine, body, prompt: list[int], stop_ids: frozenset[int], logprobs: int | None, param: str,
           default_max_tokens: int | None = None, prompt_logprobs: int | None = None, images=None):
    """Build the engine Request from an API body and queue it; engine errors become API errors."""
    max_tokens = body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    if max_tokens == 0 and len(prompt) > engine.context_len:  # scoring only: the prompt may fill the context
        raise APIError(400, f"the prompt is {len(prompt)} tokens but this model's maximum context length is "
                       f"{engine.context_len} tokens; shorten the {param}", param=param, code="context_length_exceeded")
    if max_tokens != 0 and len(prompt) >= engine.context_len:
        raise APIError(400, f"the prompt is {len(prompt)} tokens but this model's maximum context length is "
                       f"{engine.context_len} tokens, leaving no room for a completion; shorten the {param}",
                       param=param, code="context_length_exceeded")
    if max_tokens is None:
        room = engine.context_len - len(prompt)
        max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
    request = Request(prompt=prompt, max_tokens=max_tokens,
                      temperature=1.0 if body.temperature is None else body.temperature,
                      top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, seed=body.seed,
                      presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                      logprobs=logprobs, stop=tuple(body.stop or ()), stop_ids=stop_ids, n=body.n or 1,
                      prompt_logprobs=prompt_logprobs, images=images)
    try:
        return engine.submit(request)
    except ContextLengthError as e:
        raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
    except ValueError as e:
        raise APIError(400, str(e)) from None
    except QueueFullError as e:
        raise APIError(503, str(e), type="server_error", code="server_overloaded", headers={"Retry-After": "1"}) from None
    except EngineStoppedError as e:
        raise APIError(503, str(e), type="server_error", code="engine_stopped", headers={"Retry-After": "5"}) from None
