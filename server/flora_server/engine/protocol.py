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
    from flora_server.engine.constraints import ConstraintSpec, TokenConstraint

FinishReason = Literal["length", "stop", "eos", "cancelled", "deadline"]

# The process's exit status when its engine worker died (or hung in a step at shutdown), so
# that a supervisor restarts it (`flora_server.lifecycle`).
ENGINE_DEAD_EXIT = 3


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters (already validated and capped by the API layer)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    # vLLM's min_p: a sampled token's probability must be at least min_p times the most
    # likely token's (0: off)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    # Alternatives reported per generated token (TGI top_n_tokens, OpenAI top_logprobs).
    top_logprobs: int = 0
    # Report the logprob of every prompt token (TGI decoder_input_details, OpenAI echo).
    prompt_logprobs: bool = False
    ignore_eos: bool = False  # generate through EOS until max_new_tokens or a stop
    # Tokens that end the request as EOS does (vLLM's stop_token_ids), even with ignore_eos;
    # like EOS, their text is not part of the output.
    stop_token_ids: tuple[int, ...] = ()
    # vLLM's min_tokens: until this many tokens are generated, EOS and `stop_token_ids`
    # cannot be picked and stop sequences do not end the request (engine/text.py)
    min_tokens: int = 0
    # vLLM's allowed_token_ids: the only tokens the request may generate (empty: any)
    allowed_token_ids: tuple[int, ...] = ()


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter_id: str | None = None  # None: the base model
    deadline: float | None = None  # time.monotonic() after which the request is abandoned
    # Set by the engine (time.monotonic()) when the request gets a batch row: the access log
    # and tracing split queueing from prefill with it. None while waiting or when untracked.
    admitted_at: float | None = None
    # Structured output: this row's grammar (stateful, one per request); None = free text.
    constraint: TokenConstraint | None = None


@dataclass(frozen=True)
class Logprob:
    """A token with its log-probability under the model's (unprocessed) distribution.
    `text` is the token's own text in context, as `TokenEvent.token_text` (an alternative:
    the text it would have had in that place); `logprob` is None for the first prompt token
    (no context predicts it); `top` lists the most likely alternatives at that position."""

    token_id: int
    text: str
    logprob: float | None
    top: tuple[Logprob, ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text released with it.

    `token_text` is the token's own text, what logprobs and TGI's `token.text` report
    (engine/text.py): decoded in the context of the tokens before it, "" for a token that
    ends inside a multi-byte character (the token completing it has the whole character)
    and for special tokens such as EOS. `text` is the text released to the client with this
    event: held back while it could still be the start of a stop sequence (released with a
    later event, an EOS event included), so the concatenation of all `text` equals the final
    `generated_text`."""

    token_id: int
    text: str
    token_text: str
    logprob: float | None = None
    special: bool = False  # an EOS or other special token (no text of its own)
    top_logprobs: tuple[Logprob, ...] = ()  # `params.top_logprobs` alternatives, best first
    adapter_sha256: str | None = None  # as in FinishEvent (streams report it up front)


@dataclass(frozen=True)
class FinishEvent:
    reason: FinishReason
    generated_text: str
    prompt_tokens: int
    generated_tokens: int
    token_ids: tuple[int, ...] = ()
    prompt_logprobs: tuple[Logprob, ...] = ()  # one per prompt token with `prompt_logprobs`
    # sha256 of the stored adapter bytes this request ran on (`LoadedAdapter.sha256`); None
    # for the base model. The API reports it (`X-Adapter-Sha256`, `details.adapter_sha256`).
    adapter_sha256: str | None = None


GenerationEvent = TokenEvent | FinishEvent


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]
    max_slots: int
    mode: Literal["idle", "base", "merged", "batched"]
    loaded_adapters: tuple[str, ...] = field(default=())  # on device slots
    host_adapters: tuple[str, ...] = field(default=())  # validated copies in the host cache
    # Paged engine (v2) only; v1 allocates each batch's cache on demand and reports zeros.
    kv_cache_usage: float = 0.0  # fraction of the KV block pool in use, 0..1
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (counter)
    prefix_cache_hits: int = 0  # of those, tokens found cached (counter)
    kv_capacity_tokens: int = 0  # tokens the KV block pool holds (0: no pool, v1)


class EngineError(Exception):
    """Base class for errors the engine reports to the API layer."""


class AdapterNotFoundError(EngineError):
    def __init__(self, adapter_id: str) -> None:
        super().__init__(f"adapter {adapter_id!r} not found")
        self.adapter_id = adapter_id


class AdapterOfOtherBaseError(AdapterNotFoundError):
    """The id names an adapter trained for another base model (servers of several bases
    may share one store): not servable here, and never changed through this server."""

    def __init__(self, adapter_id: str, trained_for: str, this_base: str) -> None:
        EngineError.__init__(
            self,
            f"adapter {adapter_id!r} was trained for base model {trained_for!r}; this "
            f"server serves {this_base!r}",
        )
        self.adapter_id = adapter_id
        self.trained_for = trained_for


class AdapterLoadError(EngineError):
    """The stored adapter could not be loaded (corrupt on disk, digest mismatch)."""


class QueueFullError(EngineError):
    def __init__(self, retry_after: float) -> None:
        super().__init__("the request queue is full; retry later")
        self.retry_after = retry_after


class EngineNotReadyError(EngineError):
    """The engine is starting or draining for shutdown."""


class InvalidRequestError(EngineError, ValueError):
    """The request cannot be served as given (a 422): empty prompt, prompt too long, ids
    outside the vocabulary, a classify call on a model without a head. ``param`` names the
    request field to change."""

    def __init__(self, message: str, *, param: str = "prompt") -> None:
        super().__init__(message)
        self.param = param


class GrammarDeadEndError(InvalidRequestError):
    """Generation reached a point where the request's grammar allows no token and not the
    end either: no output can match it (the client's grammar is unsatisfiable, a 422;
    `constraints.dead_end_message` words it)."""


class RequestFailedError(EngineError):
    """This request failed inside the engine; other requests are unaffected."""


class DeadlineExceededError(RequestFailedError):
    """The request's deadline (FLORA_REQUEST_TIMEOUT) passed before it ran (a 504)."""


@dataclass(frozen=True)
class LoadedAdapter:
    """A validated adapter and the sha256 of the stored bytes it was read from: the engine
    carries the digest with the adapter onto its slot and into every `FinishEvent` it
    serves, so a result says which bytes produced it."""

    adapter: Adapter
    sha256: str


class AdapterSource(Protocol):
    """Where the engine gets validated adapters from (implemented by the registry)."""

    def load(self, adapter_id: str) -> LoadedAdapter | Adapter:
        """Return the validated adapter (a bare `Adapter` from a source that knows no
        digest) or raise `AdapterNotFoundError` / `AdapterLoadError`. Called on the
        engine's loader thread, never on the event loop."""
        ...

    def exists(self, adapter_id: str) -> bool: ...


class InMemorySource:
    """An `AdapterSource` over adapters already in memory (benchmarks and embedding the
    engine without a store): `adapters` maps an id to its `Adapter` or `LoadedAdapter`."""

    def __init__(self, adapters: dict[str, LoadedAdapter | Adapter]) -> None:
        self.adapters = adapters

    def load(self, adapter_id: str) -> LoadedAdapter | Adapter:
        try:
            return self.adapters[adapter_id]
        except KeyError:
            raise AdapterNotFoundError(adapter_id) from None

    def exists(self, adapter_id: str) -> bool:
        return adapter_id in self.adapters


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

    def check_adapter(self, adapter: Adapter) -> None:
        """Raise ValueError unless this engine can serve `adapter` (run at upload: 422)."""
        ...

    async def compile_constraint(self, spec: ConstraintSpec) -> TokenConstraint:
        """A fresh per-request constraint for `spec` over this engine's tokenizer;
        `ConstraintError` (a 422) when it cannot be compiled or the engine has no grammar
        support."""
        ...

    def fail_in_flight(self, reason: str) -> None:
        """End every running and queued request now with a 503 (a final error event in a
        stream that already began): the server's shutdown timeout expired."""
        ...

    def invalidate_adapter(self, adapter_id: str) -> None:
        """Forget cached copies (after delete or overwrite); running requests finish."""
        ...

    def start(self) -> None: ...

    async def shutdown(self, timeout: float) -> None: ...
