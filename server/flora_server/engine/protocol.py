"""The contract between the HTTP layer and the engine worker.

Handlers build a `GenerationRequest`, hand it to `GenerationEngine.generate` and iterate the
events it yields; they never touch torch. The engine owns the model, the device and the
adapter slots; it reads adapters through an `AdapterSource` passed to its constructor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from flora.adapter import Adapter

FinishReason = Literal["length", "stop", "eos", "cancelled", "deadline"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters (already validated and capped by the API layer)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter_id: str | None = None  # None: the base model
    deadline: float | None = None  # time.monotonic() after which the request is abandoned


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. `text` is the new text it adds (held back while it could still
    be the start of a stop sequence, so the concatenation of all `text` equals the final
    `generated_text`)."""

    token_id: int
    text: str
    logprob: float | None = None


@dataclass(frozen=True)
class FinishEvent:
    reason: FinishReason
    generated_text: str
    prompt_tokens: int
    generated_tokens: int
    token_ids: tuple[int, ...] = ()


GenerationEvent = TokenEvent | FinishEvent


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]
    max_slots: int
    mode: Literal["idle", "base", "merged", "batched"]
    loaded_adapters: tuple[str, ...] = field(default=())
    # Paged engine (v2) only; v1 reports zeros.
    kv_cache_usage: float = 0.0  # fraction of the KV block pool in use, 0..1
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (counter)
    prefix_cache_hits: int = 0  # of those, tokens found cached (counter)


class EngineError(Exception):
    """Base class for errors the engine reports to the API layer."""


class AdapterNotFoundError(EngineError):
    def __init__(self, adapter_id: str) -> None:
        super().__init__(f"adapter {adapter_id!r} not found")
        self.adapter_id = adapter_id


class AdapterLoadError(EngineError):
    """The stored adapter could not be loaded (corrupt on disk, digest mismatch)."""


class QueueFullError(EngineError):
    def __init__(self, retry_after: float) -> None:
        super().__init__("the request queue is full; retry later")
        self.retry_after = retry_after


class EngineNotReadyError(EngineError):
    """The engine is starting or draining for shutdown."""


class RequestFailedError(EngineError):
    """This request failed inside the engine; other requests are unaffected."""


class DeadlineExceededError(RequestFailedError):
    """The request's deadline (FLORA_REQUEST_TIMEOUT) passed before it ran (a 504)."""


class AdapterSource(Protocol):
    """Where the engine gets validated adapters from (implemented by the registry)."""

    def load(self, adapter_id: str) -> Adapter:
        """Return the validated adapter or raise `AdapterNotFoundError` / `AdapterLoadError`.
        Called on the engine's loader thread, never on the event loop."""
        ...

    def exists(self, adapter_id: str) -> bool: ...


class GenerationEngine(Protocol):
    kind: str  # "causal-lm"
    model_name: str
    context_length: int
    max_slots: int

    @property
    def ready(self) -> bool: ...

    @property
    def healthy(self) -> bool: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Queue the request and yield its events. Raises QueueFullError at once when the
        queue is full. Closing the iterator early (client gone) cancels the request."""
        ...

    async def tokenize(self, text: str) -> list[int]: ...

    async def render_chat(self, messages: Sequence[dict[str, str]]) -> str: ...

    def stats(self) -> EngineStats: ...

    def invalidate_adapter(self, adapter_id: str) -> None:
        """Forget cached copies (after delete or overwrite); running requests finish."""
        ...

    def start(self) -> None: ...

    async def shutdown(self, timeout: float) -> None: ...
