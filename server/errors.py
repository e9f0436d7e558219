"""The one place where exceptions become HTTP responses (OpenAI error shape)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ttscale.errors import (
    BudgetError,
    EngineUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    ShuttingDownError,
    TTScaleError,
    UpstreamError,
)

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 429 asks a client to wait

# Most specific first.
STATUS: list[tuple[type[TTScaleError], int, str]] = [
    (ModelNotFoundError, 404, "not_found_error"),
    (InvalidRequestError, 400, "invalid_request_error"),
    (BudgetError, 422, "invalid_request_error"),
    (OverloadedError, 429, "rate_limit_error"),
    (EngineUnavailableError, 503, "service_unavailable"),
    (ShuttingDownError, 503, "service_unavailable"),
    (UpstreamError, 502, "upstream_error"),
    (TTScaleError, 500, "internal_error"),
]


HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}


def error_body(message: str, type_: str, param: str | None, code: str | int | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def status_of(exc: TTScaleError) -> tuple[int, str]:
    for cls, status, type_ in STATUS:
        if isinstance(exc, cls):
            if isinstance(exc, UpstreamError):
                return exc.status, type_
            return status, type_
    return 500, "internal_error"


def error_json(exc: BaseException) -> dict[str, Any]:
    """The OpenAI error body of ``exc`` (what a stream sends as its last event)."""
    if isinstance(exc, TTScaleError):
        _, type_ = status_of(exc)
        return error_body(exc.message, type_, exc.param, exc.code)
    log.exception("unhandled error", exc_info=exc)
    return error_body("internal server error", "internal_error", None, "internal_error")


def to_response(exc: BaseException) -> JSONResponse:
    status = status_of(exc)[0] if isinstance(exc, TTScaleError) else 500
    headers = {"Retry-After": str(RETRY_AFTER_S)} if isinstance(exc, OverloadedError) else None
    return JSONResponse(error_json(exc), status_code=status, headers=headers)


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # drop pydantic's union-branch markers such as "str" / "list[int]" / "function-after[...]"
    parts = [p for p in parts if not (p[:1].islower() and ("[" in p or p in ("str", "int", "list")))]
    return ".".join(parts) or None


def install(app: FastAPI) -> None:
    @app.exception_handler(TTScaleError)
    async def _tts(_: Request, exc: TTScaleError) -> JSONResponse:
        return to_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        param = _validation_param(tuple(first.get("loc", ())))
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        elif first.get("type") == "missing":
            msg = f"missing required parameter {param!r}" if param else "the request has no body"
        else:
            msg = f"invalid parameter {param!r}: {msg}" if param else msg
        return JSONResponse(error_body(msg, "invalid_request_error", param, "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = HTTP_CODES.get(exc.status_code, "invalid_request")  # a string, like every other error's code
        return JSONResponse(error_body(str(exc.detail), type_, None, code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _any(_: Request, exc: Exception) -> JSONResponse:
        return to_response(exc)
