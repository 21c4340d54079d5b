"""OpenAI `POST /v1/embeddings`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from flora_server.schemas.limits import PositiveCount, ValidText


class EmbeddingRequest(BaseModel):
    # OpenAI clients send `user` and sometimes `dimensions`; unknown fields are ignored.
    model_config = ConfigDict(extra="ignore")

    input: ValidText | list[ValidText] = Field(description="a text or a list of texts")
    model: ValidText | None = Field(None, description="an adapter id, or the base model's name")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveCount | None = Field(
        None, description="not supported: must be the model's own"
    )
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian f32")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
