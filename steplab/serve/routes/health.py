"""``GET /`` (the chat page), ``GET /health``, ``GET /metrics``: no key needed."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import FileResponse, JSONResponse, Response

from steplab.serve.common import state
from steplab.serve.metrics import CONTENT_TYPE

STATIC = Path(__file__).resolve().parent.parent / "static"
router = APIRouter()


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(STATIC / "index.html", headers={
        "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
                                   "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'"})


@router.get("/health", summary="Liveness and per-model load")
async def health(request: HTTPRequest):
    """``engine_alive`` is the engine thread; ``running`` the sequences holding a slot; ``http_in_flight`` the
    HTTP handlers not yet finished (all models together)."""
    st = state(request)
    models = {}
    for name, engine in st.engines.items():
        snap = engine.stats()
        models[name] = {k: snap[k] for k in ("waiting", "running", "free_slots", "max_batch")} | {"engine_alive": engine.running}
    ok = all(m["engine_alive"] for m in models.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "http_in_flight": st.in_flight - 1,  # not this one
                         "models": models},
                        status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: HTTPRequest):
    return Response(state(request).metrics.render(), media_type=CONTENT_TYPE)
