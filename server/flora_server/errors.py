"""JSON errors everywhere: `{"error": {"type": ..., "message": ...}}` with the right status.

Every exception a client can cause maps to a 4xx here; only a bug in the server (or a request
that failed inside the engine) is a 5xx.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from flora_server.engine.protocol import (
    AdapterLoadError,
    AdapterNotFoundError,
    DeadlineExceededError,
    EngineError,
    EngineNotReadyError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
)

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "method_not_allowed",
    409: "conflict_error",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "request_header_fields_too_large",  # the type guards.py answers with
    503: "service_unavailable",
}


class APIError(Exception):
    """An error the API answers with `status` and a JSON body; `param` names the field."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error")
        self.param = param
        self.headers = headers


def invalid_field(param: str, message: str) -> APIError:
    """A 422 naming the field that is wrong."""
    return APIError(422, f"{param}: {message}", param=param)


def error_body(type_: str, message: str, param: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": type_, "message": message}
    if param is not None:
        error["param"] = param
    return {"error": error}


def _response(err: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(err.type, err.message, err.param), status_code=err.status, headers=err.headers
    )


def engine_error_to_api(exc: EngineError) -> APIError:
    """Map an engine error to the status the client sees."""
    if isinstance(exc, AdapterNotFoundError):
        return APIError(404, str(exc), param="adapter_id")
    if isinstance(exc, QueueFullError):
        retry = max(1, math.ceil(exc.retry_after))
        return APIError(429, str(exc), headers={"Retry-After": str(retry)})
    if isinstance(exc, EngineNotReadyError):
        return APIError(503, str(exc) or "the model is not ready", headers={"Retry-After": "1"})
    if isinstance(exc, InvalidRequestError):
        # The request itself is unusable (empty prompt, ids outside the vocabulary, no head).
        return APIError(422, str(exc), param=exc.param)
    if isinstance(exc, AdapterLoadError):
        # The stored bytes are bad (not the client's request): the adapter is unusable.
        return APIError(500, f"adapter could not be loaded: {exc}", type="adapter_load_error")
    if isinstance(exc, DeadlineExceededError):
        # What the generation routes answer when a request expires before its first token.
        return APIError(
            504,
            f"{exc} (FLORA_REQUEST_TIMEOUT covers queueing and inference)",
            type="timeout_error",
        )
    if isinstance(exc, RequestFailedError):
        return APIError(500, str(exc) or "the request failed", type="server_error")
    return APIError(500, str(exc) or type(exc).__name__, type="server_error")


def _field_name(loc: tuple[Any, ...]) -> str:
    # ("body", "parameters", "max_new_tokens") -> "parameters.max_new_tokens"
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every known exception into the JSON error shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _response(exc)

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError) -> JSONResponse:
        err = engine_error_to_api(exc)
        if err.status >= 500:
            logger.error("engine error: %s", exc)
        return _response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return _response(APIError(exc.status_code, message, headers=exc.headers))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = _field_name(tuple(first.get("loc", ())))
        messages = "; ".join(
            f"{_field_name(tuple(e.get('loc', ())))}: {e.get('msg', '')}" for e in errors
        )
        return _response(APIError(422, messages, param=param))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return _response(APIError(500, "internal server error", type="server_error"))
