"""``GET /v1/models`` and ``GET /v1/models/{id}``."""
from __future__ import annotations

from fastapi import APIRouter, Request as HTTPRequest

from steplab.serve.common import engine_for, guard, state

router = APIRouter()


def model_card(request: HTTPRequest, name: str) -> dict:
    st = state(request)
    return {"id": name, "object": "model", "created": st.created, "owned_by": "steplab",
            "context_length": st.engines[name].context_len}


@router.get("/v1/models", summary="List the served models")
async def list_models(request: HTTPRequest):
    guard(request)
    return {"object": "list", "data": [model_card(request, name) for name in state(request).engines]}


@router.get("/v1/models/{name:path}", summary="One served model")
async def get_model(name: str, request: HTTPRequest):
    guard(request)
    engine_for(request, name)
    return model_card(request, name)
