"""OpenAI-compatible HTTP API (FastAPI) over one continuous-batching engine per model, plus the chat page.

    app = create_app({"step-1-8k": "runs/A"}, api_keys={"sk-..."}, rate_limit="60/minute")
    uvicorn.run(app, host="127.0.0.1", port=8000, proxy_headers=False)

Routes (one module per API under ``serve/routes/``): ``GET /`` (chat page), ``GET /health``, ``GET /metrics``
(Prometheus), ``GET /openapi.json``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions``, ``POST /v1/audio/transcriptions`` and ``POST /v1/audio/speech`` (speech runs).
The /v1 routes need ``Authorization: Bearer KEY`` unless ``api_keys=None``.

Every error is OpenAI's JSON ``{"error": {"message", "type", "param", "code"}}`` (serve/errors.py) with a status a
client can act on: 400 invalid field or prompt too long for the context (with the numbers), 401 missing or wrong
key, 404 unknown model or route, 413 body over ``max_request_bytes`` (serve/gate.py), 429 rate limit or too many
failed authentications (Retry-After), 503 queue full (Retry-After). Unexpected exceptions are logged on the server
and answered with a bare 500: no stack trace ever goes out. Request bodies are parsed by hand (not FastAPI's body
parameters) so the key is checked before the body, and invalid fields give 400 rather than FastAPI's default 422.
"""
from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from steplab.infer.engine import Engine
from steplab.serve.auth import AUTH_FAILURE_LIMIT, KeyChecker, RateLimiter
from steplab.serve.common import ServeState
from steplab.serve.errors import install_error_handlers
from steplab.serve.gate import Gate
from steplab.serve.media import chat_request_bytes
from steplab.serve.metrics import Metrics
from steplab.serve.routes import audio, chat, completions, health, models as model_routes, videos as video_routes
from steplab.serve.schema import openapi_components


def load_engine(name: str, spec: Any, *, device: str = "cpu", dtype: str | None = None, max_batch: int = 8, max_queue: int = 64,
                prefill_chunk: int = 512, max_len: int | None = None, decode: str = "eager") -> Engine:
    """An Engine from a run directory, a ``(model, tokenizer)`` pair, or an Engine (returned as is).
    ``decode``: eager | static | compiled, or auto (compiled for a dense float model, else eager: infer/decode.py)."""
    if isinstance(spec, Engine):
        return spec
    if isinstance(spec, tuple):
        model, tokenizer = spec
    else:
        from steplab.train.checkpoint import load_run

        _, model, tokenizer, _ = load_run(spec, device=device)
    if dtype is not None:
        from steplab.infer.prompts import torch_dtype

        model = model.to(torch_dtype(dtype))
    if decode == "auto":
        from steplab.infer.decode import auto_mode

        decode = auto_mode(model)
    return Engine(model, tokenizer, name=name, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                  max_len=max_len, decode=decode)


def create_app(models: dict[str, Any], *, api_keys: set[str] | None, rate_limit: str | list | None = None,
               auth_failure_limit: str | None = AUTH_FAILURE_LIMIT, trusted_proxies: list[str] | None = None,
               max_request_bytes: int = 1_000_000, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 512,
               max_len: int | None = None, device: str = "cpu", dtype: str | None = None,
               max_chat_request_bytes: int | None = None, allow_remote_images: bool = False, videos=None,
               decode: str = "eager") -> FastAPI:
    """The API over ``models``: name -> run directory, ``Engine``, or ``(model, tokenizer)``.

    ``api_keys=None`` turns authentication off (the caller must say so; an empty set is refused).
    ``rate_limit``: ``"60/minute"``-style (several joined by ';'), per key (per client address when auth is off).
    ``auth_failure_limit``: failed authentications allowed per client address before 429s (None: no limit).
    ``trusted_proxies``: addresses/networks whose ``X-Forwarded-For`` names the client (default: none, the peer
    address is the client). ``max_request_bytes`` limits every body except the chat route's, which takes
    images: ``max_chat_request_bytes`` (default: that plus room for serve/media.py's MAX_IMAGES images when a
    served model reads images, else the same limit).
    ``allow_remote_images``: fetch http(s) image URLs (default: refuse them with a 400). Engines built here are started with the app and stopped with it; engines passed in
    are started if needed and left running. ``videos``: a serve/video_jobs.VideoService for ``/v1/videos``.
    ``decode``: how engines built here decode (``load_engine``).
    """
    if not models and videos is None:
        raise ValueError("create_app needs at least one model")
    owned = {name for name, spec in models.items() if not isinstance(spec, Engine)}
    engines = {name: load_engine(name, spec, device=device, dtype=dtype, max_batch=max_batch, max_queue=max_queue,
                                 prefill_chunk=prefill_chunk, max_len=max_len, decode=decode)
               for name, spec in models.items()}
    metrics = Metrics(engines)
    st = ServeState(engines=engines, metrics=metrics, created=int(time.time()),
                    checker=KeyChecker(api_keys) if api_keys is not None else None,
                    limiter=RateLimiter(rate_limit) if rate_limit else None,
                    auth_failures=RateLimiter(auth_failure_limit) if auth_failure_limit and api_keys is not None else None,
                    allow_remote_images=allow_remote_images, videos=videos)

    @asynccontextmanager
    async def lifespan(app):
        for engine in engines.values():
            engine.start()
        if videos is not None:
            videos.start()
        yield
        for name in owned:
            engines[name].stop()
        if videos is not None:
            videos.stop()

    app = FastAPI(title="steplab", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serve = st
    app.state.engines = engines
    app.state.metrics = metrics
    app.state.speech = audio.speech_models(models, engines)  # runs with a speech tokenizer serve /v1/audio/*
    install_error_handlers(app)
    for module in (health, model_routes, completions, chat, audio, video_routes):
        app.include_router(module.router)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description="OpenAI-compatible API of steplab serve")
            components = schema.setdefault("components", {})
            components.setdefault("schemas", {}).update(openapi_components())
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in schema["paths"].items():
                for op in ops.values():
                    if path.startswith("/v1/") and api_keys is not None:
                        op["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    reads_images = any(getattr(getattr(e.model.cfg, "vision", None), "image_size", 0) for e in engines.values())
    chat_bytes = max_chat_request_bytes or (chat_request_bytes(max_request_bytes) if reads_images else max_request_bytes)
    app.add_middleware(Gate, max_bytes=max_request_bytes, metrics=metrics, state=st,
                       route_bytes={"/v1/chat/completions": chat_bytes})
    if trusted_proxies:
        from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=list(trusted_proxies))
    return app
