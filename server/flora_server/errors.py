"""JSON errors everywhere: `{"error": {"type": ..., "message": ...}}` with the right status.

Every exception a client can cause maps to a 4xx here; only a bug in the server (or a request
that failed inside the engine) is a 5xx. An adapter store that cannot be reached
(`StoreUnavailableError`, from any route or from the engine's adapter load) is a 503 with
Retry-After naming the store; `/ready` stays 200 meanwhile (docs/server.md, "Adapter store").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from flora_server.adapters.store import StoreUnavailableError
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
        headers: Mapping[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error")
        self.param = param
        self.headers = headers
        self.code = code  # OpenAI's machine-readable code (`context_length_exceeded`, ...)


def invalid_field(param: str, message: str) -> APIError:
    """A 422 naming the field that is wrong."""
    return APIError(422, f"{param}: {message}", param=param)


def error_body(
    type_: str, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"type": type_, "message": message}
    if param is not None:
        error["param"] = param
    if code is not None:
        error["code"] = code
    return {"error": error}


def _response(err: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(err.type, err.message, err.param, err.code),
        status_code=err.status,
        headers=err.headers,
    )


STORE_RETRY_AFTER_SECONDS = 5


def store_unavailable_to_api(exc: StoreUnavailableError) -> APIError:
    """503 naming the store and the cause a client may see (`exc.reason`: an error class or
    S3's code, never the endpoint's address or a credential)."""
    return APIError(
        503,
        f"the adapter store is unavailable: {exc.reason}",
        type="adapter_store_unavailable",
        headers={"Retry-After": str(STORE_RETRY_AFTER_SECONDS)},
    )


def engine_error_to_api(exc: EngineError) -> APIError:
    """Map an engine error to the status the client sees."""
    if isinstance(exc, StoreUnavailableError):  # an adapter load the store could not serve
        return store_unavailable_to_api(exc)
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


_LOC_ROOTS = ("body", "query", "path", "header")
# Types a malformed body can fail with while FastAPI parses it (before any validation).
_BODY_PARSE_ERRORS = (UnicodeDecodeError, RecursionError)


def _is_union_member(part: Any) -> bool:
    # pydantic names the member of a union in the location: "str", "list[ContentPart]",
    # "function-before[valid_unicode(), str]", "list[constrained-int]"; no field does.
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


def _field_name(loc: tuple[Any, ...]) -> str:
    # ("body", "parameters", "max_new_tokens") -> "parameters.max_new_tokens"
    parts = [str(p) for p in loc if p not in _LOC_ROOTS and not _is_union_member(p)]
    return ".".join(parts) or "body"


def _validation_errors(errors: Sequence[Any]) -> list[tuple[str, str]]:
    """(field, message) pairs, one per field. A union field fails once per member: where
    one member said what is wrong with the value, the other members' "not a string"-style
    type errors under the same top-level field are noise and dropped. Invalid JSON names the
    body and where it broke (not the position as a field)."""
    found: list[tuple[str, str, str]] = []  # (field, type, message)
    for e in errors:
        kind = str(e.get("type", ""))
        if kind == "json_invalid":
            loc = tuple(e.get("loc", ()))
            where = f" at position {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
            reason = (e.get("ctx") or {}).get("error", "")
            found.append(("body", kind, f"invalid JSON{where}: {reason}".rstrip(": ")))
            continue
        message = str(e.get("msg", "")).removeprefix("Value error, ")
        found.append((_field_name(tuple(e.get("loc", ()))), kind, message))
    specific = {f.split(".")[0] for f, kind, _ in found if not kind.endswith("_type")}

    def noise(field: str, kind: str) -> bool:
        return kind.endswith("_type") and field.split(".")[0] in specific

    out: dict[str, str] = {}
    for field, kind, message in found:
        if not noise(field, kind):
            out.setdefault(field, message)
    return list(out.items())


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every known exception into the JSON error shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _response(exc)

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError) -> JSONResponse:
        err = engine_error_to_api(exc)
        if err.status == 503:
            logger.warning("engine error: %s", exc)
        elif err.status >= 500:
            logger.error("engine error: %s", exc)
        return _response(err)

    @app.exception_handler(StoreUnavailableError)
    async def _store_unavailable(_: Request, exc: StoreUnavailableError) -> JSONResponse:
        logger.warning("adapter store unavailable: %s", exc)
        return _response(store_unavailable_to_api(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and isinstance(exc.__cause__, _BODY_PARSE_ERRORS):
            # FastAPI answers 400 when the JSON parser itself raised: bytes that are not
            # UTF-8, or nesting deeper than the parser's recursion limit. Like any other
            # malformed body, that is a 422 on the body.
            reason = (
                "not valid UTF-8"
                if isinstance(exc.__cause__, UnicodeDecodeError)
                else "nested too deeply"
            )
            return _response(APIError(422, f"body: invalid JSON: {reason}", param="body"))
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return _response(APIError(exc.status_code, message, headers=exc.headers))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _validation_errors(exc.errors()) or [("body", "invalid request")]
        messages = "; ".join(f"{name}: {msg}" for name, msg in errors)
        return _response(APIError(422, messages, param=errors[0][0]))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return _response(APIError(500, "internal server error", type="server_error"))
