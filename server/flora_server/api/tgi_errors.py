"""TGI's flat error shape on the TGI routes: `{"error": "<message>", "error_type": "..."}`.

The rest of the API answers `{"error": {"type": ..., "message": ...}}`; TGI's, LoRAX's and
`huggingface_hub`'s clients read the flat shape and pick their exception class from
`error_type` (`validation`, `overloaded`, `generation`, ...) or else from the status. Rather
than a second set of exception handlers, `FlatErrorMiddleware` rewrites the nested body of
any error answered on a TGI path, so every source of errors (handlers, guards, auth) is
covered by one rule.
"""

from __future__ import annotations

import json
from typing import Any

from flora_server.engine.protocol import EngineError
from flora_server.errors import APIError, engine_error_to_api

TGI_PATHS = frozenset({"/", "/generate", "/generate_stream", "/info"})

# TGI's error types; other statuses keep this API's type (authentication_error,
# not_found_error, payload_too_large, timeout_error, ...) and clients fall back on the status.
_ERROR_TYPE_BY_STATUS = {
    400: "validation",
    422: "validation",
    429: "overloaded",
    503: "overloaded",
    499: "incomplete_generation",
    500: "generation",
}


def flat_body(status: int, type_: str, message: str, param: str | None = None) -> dict[str, str]:
    """TGI's error body: the status picks TGI's error_type; others keep this API's type.
    `param` (the field at fault, when known) is an extra key TGI's clients ignore."""
    body = {"error": message, "error_type": _ERROR_TYPE_BY_STATUS.get(status, type_)}
    if param is not None:
        body["param"] = param
    return body


def sse_error(exc: Exception) -> bytes:
    """An error after a TGI stream began (status already 200), as one flat event."""
    err = engine_error_to_api(exc) if isinstance(exc, EngineError) else exc
    if not isinstance(err, APIError):
        err = APIError(500, "internal server error", type="server_error")
    body = flat_body(err.status, err.type, err.message)
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


def _flatten(body: bytes, status: int) -> bytes | None:
    try:
        data = json.loads(body)
        nested = data["error"]
        param = nested.get("param")
        flat = flat_body(status, str(nested["type"]), str(nested["message"]), param)
    except (ValueError, KeyError, TypeError):
        return None
    return json.dumps(flat).encode()


class FlatErrorMiddleware:
    """Pure ASGI: on `TGI_PATHS`, error responses (status >= 400, JSON) get the flat body.
    Successful responses and streams pass through untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") not in TGI_PATHS:
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] | None = None
        chunks: list[bytes] = []

        async def send_wrapper(message: Any) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message  # held until the body is complete
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            flat = _flatten(body, start["status"])
            if flat is not None:
                body = flat
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, send_wrapper)
