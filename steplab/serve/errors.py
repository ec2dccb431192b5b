"""OpenAI's error JSON and the exception handlers that produce it.

Every error leaves the server as ``{"error": {"message", "type", "param", "code"}}`` with a status a client can
act on; unexpected exceptions are logged here and answered with a bare 500 (no stack trace ever goes out).
"""
from __future__ import annotations

import logging
import re

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("steplab.serve")
_TYPE_TAGS = {"body", "str", "int", "float", "bool", "none", "list", "dict"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


def validation_error(e: ValidationError | RequestValidationError) -> APIError:
    first = e.errors()[0]
    # pydantic puts union members and validators in the location ("str", "list[int]", "function-after[...]"):
    # keep only the field path, e.g. "messages.0.role"
    loc = [str(part) for part in first.get("loc", ())]
    param = ".".join(p for p in loc if re.fullmatch(r"[A-Za-z_]\w*|\d+", p) and p not in _TYPE_TAGS) or None
    return APIError(400, f"invalid value for '{param or 'body'}': {first.get('msg', 'invalid')}", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e):
        return error_response(validation_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(error_body(message, code=kind), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request, e):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error; the server log has the details", "server_error"), status_code=500)
