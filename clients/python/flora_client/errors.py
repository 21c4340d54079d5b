"""Typed exceptions for flora-serve responses.

The server answers every error as ``{"error": {"type": ..., "message": ...}}`` with a status
code; `error_from_response` turns such a response into one exception class per status so
callers can write ``except NotFound:`` instead of comparing numbers.
"""

from __future__ import annotations

import json
import re
import time
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

__all__ = [
    "APIError",
    "BadRequest",
    "Conflict",
    "FloraConnectionError",
    "FloraError",
    "FloraTimeoutError",
    "Forbidden",
    "NotFound",
    "NotReady",
    "Overloaded",
    "PayloadTooLarge",
    "ServerError",
    "StreamError",
    "Unauthorized",
    "ValidationError",
    "error_from_response",
    "parse_retry_after",
]


class FloraError(Exception):
    """Base class of every exception this package raises."""


class FloraConnectionError(FloraError):
    """The server could not be reached (refused, DNS, reset before a response)."""


class FloraTimeoutError(FloraError):
    """A request, or `wait_ready`, ran past its timeout."""


class APIError(FloraError):
    """The server answered with an error status.

    Attributes: ``status_code``, ``error_type`` (the server's ``error.type``), ``message``
    and ``body`` (the decoded JSON body, or None when it was not JSON).
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        error_type: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error_type = error_type
        self.body = body

    def __str__(self) -> str:
        kind = f" {self.error_type}" if self.error_type else ""
        return f"{self.status_code}{kind}: {self.message}"


class BadRequest(APIError):
    """400: malformed request, e.g. an upload whose sha256 did not match."""


class Unauthorized(APIError):
    """401: no API key, or an unknown one."""


class Forbidden(APIError):
    """403: the key is valid but may not do this (an inference key on /v1/adapters)."""


class NotFound(APIError):
    """404: unknown adapter, model or route."""


class Conflict(APIError):
    """409: an adapter with this id and different bytes exists (upload with overwrite)."""


class PayloadTooLarge(APIError):
    """413: the upload is larger than the server accepts."""


class ValidationError(APIError):
    """422: the request failed validation; ``field`` names the offending field when the
    server said which one (e.g. ``"parameters.max_new_tokens"``), else None."""

    def __init__(self, message: str, *, field: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.field = field


class _RetryAfterError(APIError):
    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class Overloaded(_RetryAfterError):
    """429: the server's queue is full; nothing ran. ``retry_after`` is in seconds (or None)."""


class NotReady(_RetryAfterError):
    """503: the server is up but not ready (model loading, draining). ``retry_after`` as above."""


class ServerError(APIError):
    """5xx other than 503: a server bug or an upstream failure."""


class StreamError(APIError):
    """The server reported an error inside a stream that had already started (the HTTP
    status was 200, so ``status_code`` is 200 and ``error_type`` says what went wrong)."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationError,
    429: Overloaded,
    503: NotReady,
}


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date.

    Returns None when absent or unparsable; never negative.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


# A field named at the start of a message: "parameters.max_new_tokens: must be <= 512" or
# "body.parameters.max_new_tokens: ..." (FastAPI's loc joined with dots).
_LEADING_FIELD = re.compile(r"^\s*(?:body\.)?([A-Za-z_][\w\-]*(?:\.[\w\-]+)*)\s*:")
# Or quoted anywhere: "field 'temperature' ..." / "`top_p` must be ...".
_QUOTED_FIELD = re.compile(r"(?:field|parameter)\s+['\"`]([\w.\-]+)['\"`]|`([\w.\-]+)`")


def _field_from_loc(loc: Any) -> str | None:
    if not isinstance(loc, list | tuple) or not loc:
        return None
    parts = [str(p) for p in loc]
    if parts[0] in ("body", "query", "path", "header", "form"):
        parts = parts[1:]
    return ".".join(parts) or None


def _field_from_body(error: dict[str, Any], body: Any, message: str) -> str | None:
    for key in ("field", "param", "loc"):
        value = error.get(key)
        if isinstance(value, str) and value:
            return value.removeprefix("body.")
        if isinstance(value, list):
            found = _field_from_loc(value)
            if found:
                return found
    # FastAPI's default 422 body: {"detail": [{"loc": [...], "msg": ...}]}.
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        found = _field_from_loc(detail[0].get("loc"))
        if found:
            return found
    match = _LEADING_FIELD.match(message)
    if match:
        return match.group(1)
    match = _QUOTED_FIELD.search(message)
    if match:
        return match.group(1) or match.group(2)
    return None


def _decode(response: httpx.Response) -> tuple[Any, dict[str, Any], str]:
    """(body, error object, message) from any error response, JSON or not."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        text = response.text.strip() if response.content else ""
        return None, {}, (text[:300] or response.reason_phrase or "error")
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or error.get("type") or "error")
        return body, error, message
    if isinstance(error, str):  # TGI's flat shape (the TGI routes)
        flat = {"type": body.get("error_type"), "param": body.get("param")}
        return body, {k: v for k, v in flat.items() if v is not None}, error
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str):
        return body, {}, detail
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        return body, {}, str(detail[0].get("msg", "validation error"))
    return body, {}, (response.reason_phrase or "error")


def error_from_response(response: httpx.Response) -> APIError:
    """The exception for an error response (status >= 400). It is returned, not raised."""
    body, error, message = _decode(response)
    status = response.status_code
    kwargs: dict[str, Any] = {
        "status_code": status,
        "error_type": error.get("type") if isinstance(error.get("type"), str) else None,
        "body": body,
    }
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else APIError
    if cls is ValidationError:
        return ValidationError(message, field=_field_from_body(error, body, message), **kwargs)
    if issubclass(cls, _RetryAfterError):
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        return cls(message, retry_after=retry_after, **kwargs)
    return cls(message, **kwargs)
