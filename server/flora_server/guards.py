"""ASGI guards in front of every route: the header caps, the request-body cap and
authentication of the generated documentation routes.

Headers: uvicorn's h11 `max_incomplete_event_size` only bounds a request head that arrives in
pieces (h11 parses a head that comes in one read without looking at its size), so the caps
on the head's size (`max_header_bytes`) and header count (`max_header_count`) are enforced
here as well: 431 before any route runs.

The body cap counts bytes as they arrive (a chunked body without Content-Length is capped
too) and answers 413 before the handler has read more than the limit. Adapter uploads are
exempt: `/v1/adapters` streams to disk under its own, larger cap (`max_upload_bytes`).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException

from flora_server import auth
from flora_server.settings import Settings

# FastAPI's own routes: they carry no data, but with keys configured nothing but the probes
# is open (the API surface is itself information).
DOC_PATHS = ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
UPLOAD_PREFIX = "/v1/adapters"


class BodyTooLargeError(HTTPException):
    """Raised from `receive` once the body passes the cap; FastAPI lets HTTPException through
    its body parsing, and the app's handler turns it into the JSON 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


async def _send_json(send: Any, status: int, type_: str, message: str, headers: dict) -> None:
    body = json.dumps({"error": {"type": type_, "message": message}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class RequestGuardMiddleware:
    """Pure ASGI (streaming responses and disconnects pass through untouched)."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.limit = settings.max_request_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self._head_refusal(scope)
        if refused is not None:
            await _send_json(send, 431, "request_header_fields_too_large", refused, {})
            return
        path: str = scope.get("path", "")
        if path in DOC_PATHS and self.settings.auth_enabled:
            key = self._presented_key(scope)
            if key is None:
                await _send_json(
                    send,
                    401,
                    "authentication_error",
                    "missing or unknown API key (Authorization: Bearer ...)",
                    {"WWW-Authenticate": "Bearer"},
                )
                return
            if key.role == "metrics":
                await _send_json(send, 403, "permission_error", auth.METRICS_KEY_ONLY, {})
                return
        if path == UPLOAD_PREFIX or path.startswith(UPLOAD_PREFIX + "/"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            message = f"request body of {declared} bytes exceeds the limit of {self.limit} bytes"
            await _send_json(send, 413, "payload_too_large", message, {})
            return
        received = 0
        limit = self.limit

        async def capped_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit)
            return message

        await self.app(scope, capped_receive, send)

    def _head_refusal(self, scope: Any) -> str | None:
        """Why the request head is refused (None: it is within the caps). Its size is
        counted as on the wire: request line plus `name: value\\r\\n` per header."""
        headers = scope.get("headers", ())
        limit = self.settings.max_header_count
        if len(headers) > limit:
            return f"{len(headers)} headers exceed the limit of {limit}"
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 16
        size += sum(len(name) + len(value) + 4 for name, value in headers)
        if size > self.settings.max_header_bytes:
            return (
                f"request line and headers of about {size} bytes exceed the limit of "
                f"{self.settings.max_header_bytes} bytes"
            )
        return None

    def _presented_key(self, scope: Any) -> auth.ApiKey | None:
        """The configured key (any role) the request's bearer token is, or None."""
        settings = self.settings
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and token:
                    keys = auth.configured_keys(
                        tuple(settings.api_keys),
                        tuple(settings.admin_keys),
                        tuple(settings.metrics_keys),
                    )
                    return auth.identify(token.strip(), keys)
        return None


def _content_length(scope: Any) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1")
            return int(text) if text.isdigit() else None
    return None
