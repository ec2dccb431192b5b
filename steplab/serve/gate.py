"""The request gate: a pure ASGI middleware (streaming responses pass through untouched) that

* rejects bodies over ``max_bytes`` with 413 before any parsing (with or without Content-Length),
* counts HTTP handlers in flight (``/health`` and ``/metrics`` show it: a hung handler is visible),
* times every request for ``/metrics``.
"""
from __future__ import annotations

import json
import time

from steplab.serve.errors import error_body
from steplab.serve.metrics import Metrics

ENDPOINTS = {"/", "/health", "/metrics", "/openapi.json", "/v1/models", "/v1/completions", "/v1/chat/completions",
             "/v1/audio/transcriptions", "/v1/audio/speech"}


class Gate:
    """``max_bytes`` for every route, except the paths in ``route_bytes`` (e.g. the chat route, which takes images)."""

    def __init__(self, app, max_bytes: int, metrics: Metrics, state, route_bytes: dict[str, int] | None = None):
        self.app, self.max_bytes, self.metrics, self.state = app, max_bytes, metrics, state
        self.route_bytes = route_bytes or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [0]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        self.state.in_flight += 1  # only touched from the event loop
        self.metrics.in_flight.inc()
        try:
            if scope["method"] not in ("POST", "PUT", "PATCH"):
                return await self.app(scope, receive, send_status)
            limit = self.route_bytes.get(path, self.max_bytes)
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                return await self._too_large(send_status, limit)
            body, more = bytearray(), True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > limit:
                    return await self._too_large(send_status, limit)
            replay = [{"type": "http.request", "body": bytes(body), "more_body": False}]

            async def receive_again():
                return replay.pop() if replay else await receive()

            await self.app(scope, receive_again, send_status)
        except BaseException:
            status[0] = status[0] or 500
            raise
        finally:
            self.state.in_flight -= 1
            self.metrics.in_flight.dec()
            self.metrics.observe_request(endpoint, status[0] or 499, time.perf_counter() - started)

    async def _too_large(self, send, limit: int) -> None:
        body = json.dumps(error_body(f"request body is larger than this route's limit of {limit} bytes",
                                     code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
