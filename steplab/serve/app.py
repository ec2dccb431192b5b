"""OpenAI-compatible HTTP API (FastAPI) over one continuous-batching engine per model, plus the chat page.

    app = create_app({"step-1-8k": "runs/A"}, api_keys={"sk-..."}, rate_limit="60/min")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: ``GET /`` (chat page), ``GET /health``, ``GET /metrics`` (Prometheus text format), ``GET /v1/models``,
``GET /v1/models/{id}``, ``POST /v1/completions``, ``POST /v1/chat/completions``. The /v1 routes need
``Authorization: Bearer KEY`` unless ``api_keys=None``.

Every error is OpenAI's JSON ``{"error": {"message", "type", "param", "code"}}`` with a status a client can act
on: 400 invalid field or prompt too long for the context (with the numbers), 401 missing or wrong key, 404
unknown model or route, 413 body over ``max_request_bytes``, 429 rate limit (Retry-After), 503 queue full
(Retry-After). Unexpected exceptions are logged on the server and answered with a bare 500: no stack trace
ever goes out. Request bodies are parsed by hand (not FastAPI's body parameters) so the key is checked before
the body, and invalid fields give 400 rather than FastAPI's default 422.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections import defaultdict
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from steplab.infer.engine import (ContextLengthError, Engine, EngineStoppedError, QueueFullError, Request,
                                  chat_stop_ids, encode_chat)
from steplab.serve.auth import KeyChecker, RateLimiter, parse_rate
from steplab.serve.schema import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("steplab.serve")
STATIC = Path(__file__).parent / "static"
_TYPE_TAGS = {"body", "str", "int", "float", "bool", "none", "list", "dict"}


# ---- errors ----------------------------------------------------------------------------------------------

class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


def _validation_error(e: ValidationError | RequestValidationError) -> APIError:
    first = e.errors()[0]
    # pydantic puts union members and validators in the location ("str", "list[int]", "function-after[...]"):
    # keep only the field path, e.g. "messages.0.role"
    loc = [str(part) for part in first.get("loc", ())]
    param = ".".join(p for p in loc if re.fullmatch(r"[A-Za-z_]\w*|\d+", p) and p not in _TYPE_TAGS) or None
    return APIError(400, f"invalid value for '{param or 'body'}': {first.get('msg', 'invalid')}", param=param, code="invalid_value")


# ---- metrics (Prometheus text format 0.0.4, written by hand: no extra dependency) -------------------------

class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, le in enumerate(self.buckets):
            if value <= le:
                self.counts[i] += 1
        self.sum += value
        self.count += 1


def _labels(**labels: str) -> str:
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34)).replace(chr(10), " ")}"'
                     for k, v in labels.items())
    return "{" + inner + "}"


class Metrics:
    LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
    TTFT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = defaultdict(lambda: Histogram(self.LATENCY))
        self.ttft: dict[str, Histogram] = defaultdict(lambda: Histogram(self.TTFT))

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[(endpoint, status)] += 1
        self.latency[endpoint].observe(seconds)

    def render(self, engines: dict[str, Engine]) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help: str) -> None:
            out.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}"])

        def histogram(name: str, label: str, hists: dict[str, Histogram]) -> None:
            for key, h in sorted(hists.items()):
                for le, c in zip(h.buckets, h.counts):
                    out.append(f"{name}_bucket{_labels(**{label: key, 'le': repr(float(le))})} {c}")
                out.append(f"{name}_bucket{_labels(**{label: key, 'le': '+Inf'})} {h.count}")
                out.append(f"{name}_sum{_labels(**{label: key})} {h.sum}")
                out.append(f"{name}_count{_labels(**{label: key})} {h.count}")

        family("steplab_requests_total", "counter", "HTTP requests by endpoint and status code.")
        for (endpoint, status), n in sorted(self.requests.items()):
            out.append(f"steplab_requests_total{_labels(endpoint=endpoint, status=str(status))} {n}")
        family("steplab_request_duration_seconds", "histogram", "Time from request to the last byte of the response.")
        histogram("steplab_request_duration_seconds", "endpoint", self.latency)
        family("steplab_time_to_first_token_seconds", "histogram", "Time from request to the first generated token.")
        histogram("steplab_time_to_first_token_seconds", "model", self.ttft)
        per_model = [
            ("steplab_prompt_tokens_total", "counter", "Prompt tokens prefilled.", lambda e: e.prompt_tokens_total),
            ("steplab_generation_tokens_total", "counter", "Tokens generated.", lambda e: e.generation_tokens_total),
            ("steplab_rejected_requests_total", "counter", "Requests turned away because the queue was full.", lambda e: e.rejected_total),
            ("steplab_queue_depth", "gauge", "Requests waiting for a slot.", lambda e: e.stats()["waiting"]),
            ("steplab_running_sequences", "gauge", "Sequences holding a KV-cache slot.", lambda e: e.stats()["running"]),
            ("steplab_batch_slots", "gauge", "KV-cache slots (the maximum batch).", lambda e: e.max_batch),
        ]
        for name, kind, help, get in per_model:
            family(name, kind, help)
            for model, engine in sorted(engines.items()):
                out.append(f"{name}{_labels(model=model)} {get(engine)}")
        family("steplab_finished_sequences_total", "counter", "Finished sequences by finish reason.")
        for model, engine in sorted(engines.items()):
            for reason, n in sorted(engine.finished_total.items()):
                out.append(f"steplab_finished_sequences_total{_labels(model=model, reason=reason)} {n}")
        return "\n".join(out) + "\n"


# ---- the request-size gate (pure ASGI so streaming responses pass through untouched) ----------------------

class _Gate:
    """Reject bodies over ``max_bytes`` with 413 before any parsing; time every request for /metrics."""

    ENDPOINTS = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}

    def __init__(self, app, max_bytes: int, metrics: Metrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [0]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        path = scope["path"]
        endpoint = path if path in self.ENDPOINTS else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        try:
            if scope["method"] not in ("POST", "PUT", "PATCH"):
                return await self.app(scope, receive, send_status)
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
                return await self._too_large(send_status)
            body, more = bytearray(), True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_bytes:
                    return await self._too_large(send_status)
            replay = [{"type": "http.request", "body": bytes(body), "more_body": False}]

            async def receive_again():
                return replay.pop() if replay else await receive()

            await self.app(scope, receive_again, send_status)
        except BaseException:
            status[0] = status[0] or 500
            raise
        finally:
            self.metrics.observe_request(endpoint, status[0] or 499, time.perf_counter() - started)

    async def _too_large(self, send) -> None:
        body = json.dumps(error_body(f"request body is larger than this server's limit of {self.max_bytes} bytes",
                                     code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


# ---- token strings for logprobs -------------------------------------------------------------------------

def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable stand-in character -> the byte it stands for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_table(tokenizer) -> list[tuple[str, list[int]]]:
    """(display string, UTF-8 bytes) of every token id, for the logprobs fields."""
    decoder, specials = _byte_decoder(), set(tokenizer.special_ids.values())
    hf = getattr(tokenizer, "_tok", None)
    table = []
    for i in range(tokenizer.vocab_size):
        piece = hf.id_to_token(i) if hf is not None else None
        if piece is not None and i not in specials and all(ch in decoder for ch in piece):
            raw = bytes(decoder[ch] for ch in piece)
        else:
            raw = (piece if i in specials and piece else tokenizer.decode([i])).encode("utf-8")
        table.append((raw.decode("utf-8", errors="replace"), list(raw)))
    return table


# ---- the app ----------------------------------------------------------------------------------------------

def _load_engine(name: str, spec: Any, *, device: str, max_batch: int, max_queue: int, prefill_chunk: int) -> Engine:
    if isinstance(spec, Engine):
        return spec
    if isinstance(spec, tuple):
        model, tokenizer = spec
    else:
        from steplab.train.checkpoint import load_run

        _, model, tokenizer, _ = load_run(spec, device=device)
    return Engine(model, tokenizer, name=name, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk)


def create_app(models: dict[str, Any], *, api_keys: set[str] | None, rate_limit: str | tuple[float, float] | None = None,
               max_request_bytes: int = 1_000_000, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 512,
               device: str = "cpu") -> FastAPI:
    """The API over ``models``: name -> run directory, ``Engine``, or ``(model, tokenizer)``.

    ``api_keys=None`` turns authentication off (the caller must say so; an empty set is refused).
    ``rate_limit``: ``"60/min"``-style string or ``(requests per second, burst)``, per key (per client
    address when auth is off). Engines built here are started with the app and stopped with it; engines
    passed in are started if needed and left running.
    """
    if not models:
        raise ValueError("create_app needs at least one model")
    checker = KeyChecker(api_keys) if api_keys is not None else None
    if isinstance(rate_limit, str):
        rate_limit = parse_rate(rate_limit)
    limiter = RateLimiter(*rate_limit) if rate_limit else None
    owned = {name for name, spec in models.items() if not isinstance(spec, Engine)}
    engines = {name: _load_engine(name, spec, device=device, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk)
               for name, spec in models.items()}
    tables: dict[str, list] = {}
    metrics = Metrics()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        for engine in engines.values():
            engine.start()
        yield
        for name in owned:
            engines[name].stop()

    app = FastAPI(title="steplab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engines = engines
    app.state.metrics = metrics

    # -- errors
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e):
        return error_response(_validation_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(error_body(message, code=kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, e):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error; the server log has the details", "server_error"), status_code=500)

    # -- guards and parsing
    def guard(request: HTTPRequest) -> None:
        key = None
        if checker is not None:
            ok, reason = checker.check(request.headers.get("authorization"))
            if not ok:
                raise APIError(401, reason, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            key = request.headers["authorization"].partition(" ")[2].strip()
        if limiter is not None:
            wait = limiter.acquire("key:" + key if key else "ip:" + (request.client.host if request.client else "?"))
            if wait:
                raise APIError(429, f"rate limit reached: {limiter.rate * 60:g} requests per minute (burst {limiter.burst:g}); "
                               f"retry in {wait:.1f} s", type="rate_limit_exceeded", code="rate_limit_exceeded",
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
            raise _validation_error(e) from None
        field = body.unsupported()
        if field:
            raise APIError(400, f"'{field}' is not supported by this server", param=field, code="unsupported_parameter")
        return body

    def engine_for(name: str) -> Engine:
        if name not in engines:
            raise APIError(404, f"the model '{name}' does not exist; available: {', '.join(sorted(engines))}",
                           param="model", code="model_not_found")
        return engines[name]

    def submit(engine: Engine, body, prompt: list[int], stop_ids: frozenset[int], logprobs: int | None, param: str):
        max_tokens = body.max_tokens
        if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        if len(prompt) >= engine.context_len:
            raise APIError(400, f"the prompt is {len(prompt)} tokens but this model's maximum context length is "
                           f"{engine.context_len} tokens, leaving no room for a completion; shorten the {param}",
                           param=param, code="context_length_exceeded")
        request = Request(prompt=prompt, max_tokens=max_tokens or engine.context_len - len(prompt),
                          temperature=1.0 if body.temperature is None else body.temperature,
                          top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, seed=body.seed,
                          presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                          logprobs=logprobs, stop=tuple(body.stop or ()), stop_ids=stop_ids, n=body.n or 1)
        try:
            return engine.submit(request)
        except ContextLengthError as e:
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except QueueFullError as e:
            raise APIError(503, str(e), type="server_error", code="server_overloaded", headers={"Retry-After": "1"}) from None
        except EngineStoppedError as e:
            raise APIError(503, str(e), type="server_error", code="engine_stopped") from None

    def table(name: str) -> list:
        if name not in tables:
            tables[name] = token_table(engines[name].tokenizer)
        return tables[name]

    # -- routes
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={
            "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
                                       "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'"})

    @app.get("/health")
    async def health():
        stats = {name: {**e.stats(), "running": e.running} for name, e in engines.items()}
        ok = all(e.running for e in engines.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "models": stats}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(engines), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "steplab",
                "context_length": engines[name].context_len}

    @app.get("/v1/models")
    async def list_models(request: HTTPRequest):
        guard(request)
        return {"object": "list", "data": [model_card(name) for name in engines]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: HTTPRequest):
        guard(request)
        engine_for(name)
        return model_card(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        guard(request)
        body = await parse(request, ChatCompletionRequest)
        engine = engine_for(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = encode_chat(engine.tokenizer, messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        handle = submit(engine, body, prompt, chat_stop_ids(engine.tokenizer), logprobs, "messages")
        return await respond(request, "chat", body, engine, handle)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        guard(request)
        body = await parse(request, CompletionRequest)
        engine = engine_for(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"one prompt per request (got {len(prompt)}); send them as separate requests", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt = [engine.tokenizer.bos_id] + engine.tokenizer.encode(prompt)
        handle = submit(engine, body, list(prompt), frozenset({engine.tokenizer.eos_id}), body.logprobs, "prompt")
        return await respond(request, "text", body, engine, handle)

    # -- responses
    def logprobs_json(kind: str, name: str, entries: list, offset: int = 0) -> dict | None:
        tab = table(name)
        if kind == "chat":
            def item(token, lp):
                text, raw = tab[token]
                return {"token": text, "logprob": lp, "bytes": raw}
            return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries],
                    "refusal": None}
        tokens = [tab[e.token][0] for e in entries]
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{tab[t][0]: lp for t, lp in e.top} for e in entries], "text_offset": offsets}

    def usage(handle) -> dict:
        return {"prompt_tokens": handle.prompt_tokens, "completion_tokens": handle.completion_tokens,
                "total_tokens": handle.prompt_tokens + handle.completion_tokens}

    async def watch_disconnect(request: HTTPRequest, handle) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                handle.cancel()
                return

    async def respond(request: HTTPRequest, kind: str, body, engine: Engine, handle):
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if kind == "chat" else "text_completion"
        now, name, started = int(time.time()), body.model, time.perf_counter()
        want_logprobs = handle.request.logprobs is not None
        head = {"id": rid, "object": obj + (".chunk" if kind == "chat" and body.stream else ""), "created": now, "model": name,
                "system_fingerprint": "fp_steplab"}
        watcher = asyncio.ensure_future(watch_disconnect(request, handle))

        def first_token_seen():
            if handle.first_token_at is not None:
                metrics.ttft[name].observe(handle.first_token_at - handle.submitted_at)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def sse():
                offsets = [0] * handle.request.n
                try:
                    if kind == "chat":
                        for i in range(handle.request.n):
                            choice = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                            yield _sse({**head, "choices": [choice], **({"usage": None} if include_usage else {})})
                    seen_first = False
                    async for ev in handle:
                        if not seen_first and ev.tokens:
                            seen_first = True
                            first_token_seen()
                        if ev.error:
                            yield _sse(error_body(ev.error, "server_error"))
                            continue
                        if not (ev.text or ev.finish_reason or (want_logprobs and ev.logprobs)):
                            continue
                        lp = logprobs_json(kind, name, ev.logprobs, offsets[ev.index]) if want_logprobs else None
                        offsets[ev.index] += len(ev.text)
                        if kind == "chat":
                            choice = {"index": ev.index, "delta": {"content": ev.text} if ev.text else {}, "logprobs": lp,
                                      "finish_reason": ev.finish_reason}
                        else:
                            choice = {"index": ev.index, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}
                        if body.return_token_ids:
                            choice["token_ids"] = ev.tokens
                        yield _sse({**head, "choices": [choice], **({"usage": None} if include_usage else {})})
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": usage(handle)})
                    yield "data: [DONE]\n\n"
                finally:
                    watcher.cancel()
                    if not handle.done:  # the client went away mid-stream: free the slots now
                        handle.cancel()

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        choices = [{"tokens": [], "text": [], "logprobs": [], "finish": None} for _ in range(handle.request.n)]
        errors = []
        try:
            async for ev in handle:
                c = choices[ev.index]
                c["tokens"] += ev.tokens
                c["text"].append(ev.text)
                c["logprobs"] += ev.logprobs
                if ev.error:
                    errors.append(ev.error)
                if ev.finish_reason:
                    c["finish"] = ev.finish_reason
        finally:
            watcher.cancel()
        if handle.cancelled:  # the client went away (nginx's 499: nobody reads this)
            return Response(status_code=499)
        if errors:
            raise APIError(500, errors[0], type="server_error")
        first_token_seen()
        out = []
        for i, c in enumerate(choices):
            text = "".join(c["text"])
            lp = logprobs_json(kind, name, c["logprobs"]) if want_logprobs else None
            if kind == "chat":
                choice = {"index": i, "message": {"role": "assistant", "content": text, "refusal": None}, "logprobs": lp,
                          "finish_reason": c["finish"]}
            else:
                choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": c["finish"]}
            if body.return_token_ids:
                choice["token_ids"] = c["tokens"]
            out.append(choice)
        extra = {"prompt_token_ids": handle.request.prompt} if body.return_token_ids else {}
        log.debug("%s %s: %d tokens in %.2f s", rid, name, handle.completion_tokens, time.perf_counter() - started)
        return {**head, "choices": out, "usage": usage(handle), **extra}

    app.add_middleware(_Gate, max_bytes=max_request_bytes, metrics=metrics)
    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"
