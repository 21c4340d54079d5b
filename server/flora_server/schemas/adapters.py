"""`/v1/adapters` bodies."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class AdapterInfo(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    sha256: str = Field(description="sha256 of the stored single-file adapter")
    size_bytes: int
    created: int = Field(description="when it was stored (seconds since the epoch)")
    location: Literal["stored", "host", "device"] = Field(
        description="furthest tier it has reached on this replica"
    )
    running_requests: int = 0
    waiting_requests: int = 0
    request_count: int = Field(0, description="inference requests naming it on this replica")


class AdapterDetail(AdapterInfo):
    config: dict[str, Any]
    load_count: int = Field(0, description="times this replica read it from the store")


class AdapterUploadResponse(AdapterInfo):
    status: Literal["created", "unchanged", "replaced"]


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]
    total: int
    has_more: bool
    next_after: str | None = Field(None, description="pass as `after` for the next page")


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True
