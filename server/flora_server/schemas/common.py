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
