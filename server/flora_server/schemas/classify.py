"""`POST /v1/classify`: images (JSON base64 or multipart files) or texts -> top-k labels."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from flora_server.schemas.limits import ValidText


class ClassifyRequest(BaseModel):
    """JSON body. Image servers: `inputs` are base64 images (JPEG, PNG or WebP; a
    `data:image/...;base64,` prefix is accepted). Text encoders: `inputs` are texts."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[ValidText] = Field(min_length=1, description="base64 images or texts")
    adapter_id: ValidText | None = Field(None, description="adapter to use; none: the base model")
    top_k: int = Field(5, ge=1, le=1000, description="labels per input, best first")


class LabelScore(BaseModel):
    label: str
    index: int
    score: float = Field(description="softmax probability")


class ClassifyResponse(BaseModel):
    model: str
    adapter_id: str | None
    results: list[list[LabelScore]] = Field(description="per input, top_k labels")
