"""Response types of the flora-serve HTTP API (pydantic v2).

Every model allows extra fields: a newer server may add fields, and an older client must
keep working. Field names follow the wire format (TGI/LoRAX shape for /generate, OpenAI
shape for /v1/*).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

__all__ = [
    "AdapterInfo",
    "AdapterList",
    "AdapterUploadResult",
    "ChatChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatDelta",
    "ChatMessage",
    "ChatStreamChoice",
    "ClassLabel",
    "ClassifyResponse",
    "Completion",
    "CompletionChoice",
    "Embedding",
    "EmbeddingResponse",
    "GenerateDetails",
    "GenerateResponse",
    "ModelInfo",
    "ModelList",
    "StreamResponse",
    "Token",
    "Usage",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


# --- TGI / LoRAX shape ------------------------------------------------------------------


class GenerateDetails(_Model):
    finish_reason: str
    generated_tokens: int
    prompt_tokens: int | None = None
    seed: int | None = None
    adapter_id: str | None = None


class GenerateResponse(_Model):
    generated_text: str
    details: GenerateDetails | None = None


class Token(_Model):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class StreamResponse(_Model):
    """One server-sent event of /generate_stream: a token, and on the last event also the
    whole ``generated_text`` and ``details``."""

    token: Token | None = None
    generated_text: str | None = None
    details: GenerateDetails | None = None


# --- OpenAI shape ------------------------------------------------------------------------


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionChoice(_Model):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: Any = None


class Completion(_Model):
    """A /v1/completions response, or one streamed chunk of it (same shape)."""

    id: str = ""
    object: str = "text_completion"
    created: int = 0
    model: str = ""
    choices: list[CompletionChoice]
    usage: Usage | None = None

    @property
    def text(self) -> str:
        """The first choice's text."""
        return self.choices[0].text if self.choices else ""


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant", "tool"] | str
    content: str


class ChatChoice(_Model):
    index: int = 0
    message: ChatMessage
    finish_reason: str | None = None


class ChatCompletion(_Model):
    id: str = ""
    object: str = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[ChatChoice]
    usage: Usage | None = None

    @property
    def content(self) -> str:
        """The first choice's message text."""
        return self.choices[0].message.content if self.choices else ""


class ChatDelta(_Model):
    role: str | None = None
    content: str | None = None


class ChatStreamChoice(_Model):
    index: int = 0
    delta: ChatDelta = Field(default_factory=ChatDelta)
    finish_reason: str | None = None


class ChatCompletionChunk(_Model):
    id: str = ""
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str = ""
    choices: list[ChatStreamChoice] = Field(default_factory=list)

    @property
    def content(self) -> str:
        """The text this chunk adds (empty for role-only or final chunks)."""
        if not self.choices:
            return ""
        return self.choices[0].delta.content or ""


class Embedding(_Model):
    object: str = "embedding"
    index: int
    embedding: list[float]


class EmbeddingResponse(_Model):
    object: str = "list"
    data: list[Embedding]
    model: str = ""
    usage: Usage | None = None

    @property
    def vectors(self) -> list[list[float]]:
        """The embeddings in input order."""
        return [item.embedding for item in sorted(self.data, key=lambda e: e.index)]


class ModelInfo(_Model):
    id: str
    object: str = "model"
    owned_by: str | None = None
    parent: str | None = None


class ModelList(_Model):
    object: str = "list"
    data: list[ModelInfo]


# --- classification ----------------------------------------------------------------------


class ClassLabel(_Model):
    label: str
    score: float
    index: int


class ClassifyResponse(_Model):
    """``results[i]`` holds the top-k labels of input i, best first."""

    results: list[list[ClassLabel]]


# --- adapters ----------------------------------------------------------------------------


class AdapterInfo(_Model):
    """An adapter as /v1/adapters describes it: ``sha256`` and ``size_bytes`` of the stored
    single-file form, ``created`` (seconds since the epoch), ``location`` (the furthest tier
    it reached on the replica that answered: stored, host or device), request counts; from
    ``adapters.get`` also its ``config``."""

    id: str = Field(validation_alias=AliasChoices("id", "adapter_id"))
    sha256: str | None = None
    size_bytes: int | None = None
    created: int | None = None
    location: str | None = None


class AdapterUploadResult(AdapterInfo):
    """The answer to an upload. ``status``: ``created`` (new id, HTTP 201), ``unchanged``
    (the same bytes were already stored, 200) or ``replaced`` (``overwrite=True``, 200)."""

    status: str = "created"

    @property
    def changed(self) -> bool:
        """False when the server already held exactly these bytes."""
        return self.status != "unchanged"


class AdapterList(_Model):
    """One page; pass ``next_after`` as ``after`` for the next one (or use ``offset``)."""

    data: list[AdapterInfo]
    total: int | None = None
    has_more: bool | None = None
    next_after: str | None = None
