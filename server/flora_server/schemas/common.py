"""Shapes shared by every resource."""

from __future__ import annotations

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    """Every error: `{"error": {"type": ..., "message": ...}}`."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        401: "missing or unknown API key",
        403: "the key may not use this route",
        404: "unknown adapter",
        422: "a field is invalid (the message names it)",
        429: "the queue is full (see Retry-After)",
        503: "the model is not loaded yet",
    }.items()
}


def _responses(texts: dict[int, str]) -> dict[int | str, dict[str, object]]:
    return {status: {"model": ErrorResponse, "description": text} for status, text in texts.items()}


UPLOAD_ERROR_RESPONSES = _responses(
    {
        400: "malformed multipart body, or the sha256 field does not match the bytes",
        409: "the id exists with other bytes (pass overwrite=true), or a concurrent upload won",
        413: "the upload exceeds FLORA_MAX_UPLOAD_BYTES",
        415: "not multipart/form-data",
    }
)

PROBE_503_RESPONSES = _responses(
    {503: "/health: the engine worker stopped; /ready: loading, start-up failed or draining"}
)
