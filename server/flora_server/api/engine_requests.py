"""What every generation route shares: caps (422 naming the field), building the engine
request, and iterating the engine's events with latency metrics and cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.types import Receive

from flora_server import auth, observability
from flora_server.adapters.registry import AdapterRegistry
from flora_server.engine.protocol import (
    AdapterOfOtherBaseError,
    EngineError,
    FinishEvent,
    GenerationEngine,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from flora_server.errors import APIError, engine_error_to_api, error_body, invalid_field
from flora_server.metrics import RequestTimer, ServerMetrics
from flora_server.settings import Settings

T = TypeVar("T")


@dataclass(frozen=True)
class Decoding:
    """Decoding knobs as the routes parsed them, before caps and defaults."""

    max_new_tokens: int | None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    allowed_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class FieldNames:
    """How this route names its fields in 422 messages."""

    prompt: str = "inputs"
    max_new_tokens: str = "parameters.max_new_tokens"
    stop: str = "parameters.stop"
    min_tokens: str = "min_tokens"  # only the OpenAI routes take it (vLLM's extra)


@dataclass
class Collected:
    tokens: list[TokenEvent] = field(default_factory=list)
    finish: FinishEvent | None = None


class ContextLengthError(APIError):
    """Prompt + completion do not fit the context: a 422 naming the field here; the OpenAI
    routes answer it as OpenAI does (400, code `context_length_exceeded`)."""

    def __init__(self, param: str, message: str, *, n_prompt: int, max_new: int, context: int):
        super().__init__(422, f"{param}: {message}", param=param, code="context_length_exceeded")
        self.n_prompt = n_prompt
        self.max_new = max_new
        self.context_length = context


ADAPTER_SHA256_HEADER = "X-Adapter-Sha256"


def adapter_headers(adapter_sha256: str | None) -> dict[str, str]:
    """The header naming the stored adapter bytes (sha256) that served a result, as the
    engine reported them; absent for the base model."""
    return {ADAPTER_SHA256_HEADER: adapter_sha256} if adapter_sha256 else {}


def new_request_id(prefix: str) -> str:
    """`PREFIX-<the request's X-Request-Id>` (a fresh uuid outside a request)."""
    return f"{prefix}-{observability.current_request_id() or uuid.uuid4().hex}"


def check_stop(stop: Sequence[str], settings: Settings, param: str) -> tuple[str, ...]:
    if len(stop) > settings.max_stop_sequences:
        raise invalid_field(param, f"at most {settings.max_stop_sequences} stop sequences")
    for s in stop:
        if not s:
            raise invalid_field(param, "stop sequences must not be empty")
        if len(s) > settings.max_stop_length:
            raise invalid_field(
                param, f"stop sequences are at most {settings.max_stop_length} chars"
            )
    return tuple(stop)


async def check_adapter(
    registry: AdapterRegistry, adapter_id: str | None, param: str, *, count: bool = True
) -> None:
    """404 up front for an unknown adapter (the engine would also say so, later);
    `count` records a request for it. The base model (`adapter_id` None) asks the store
    nothing. Store calls run on the store's executor: a stalled store answers 503 after
    `store_timeout` and never holds threads that other requests need."""
    if adapter_id is None:
        return
    # Another tenant's adapter answers exactly like a missing one: existence is not revealed.
    if not auth.visible(adapter_id):
        raise APIError(404, f"adapter {adapter_id!r} not found", param=param)
    if not await registry.call(registry.exists, adapter_id):
        # Says so when the id is another base's adapter (a store shared by several servers).
        error = await registry.call(registry.not_found, adapter_id)
        code = "adapter_of_other_base" if isinstance(error, AdapterOfOtherBaseError) else None
        raise APIError(404, str(error), param=param, code=code)
    if count:
        registry.count_request(adapter_id)


def build_request(
    *,
    prompt_ids: list[int],
    adapter_id: str | None,
    decoding: Decoding,
    settings: Settings,
    context_length: int,
    names: FieldNames,
    request_id: str,
) -> GenerationRequest:
    """Apply the caps and defaults; the result is what the engine runs.

    prompt + max_new_tokens must fit the context: an explicit max_new_tokens that does not
    fit is a 422 naming it; the default shrinks to fit.
    """
    n_prompt = len(prompt_ids)
    if n_prompt == 0:
        raise invalid_field(names.prompt, "the prompt is empty")
    if n_prompt >= context_length:
        raise ContextLengthError(
            names.prompt,
            f"{n_prompt} prompt tokens leave no room in the context of {context_length}",
            n_prompt=n_prompt,
            max_new=decoding.max_new_tokens or 0,
            context=context_length,
        )
    room = context_length - n_prompt
    if decoding.max_new_tokens is None:
        # The default, raised to a `min_tokens` above it (as vLLM's default is the context).
        wanted = max(settings.default_max_new_tokens, decoding.min_tokens)
        max_new = min(wanted, settings.max_new_tokens, room)
    else:
        max_new = decoding.max_new_tokens
        if max_new > settings.max_new_tokens:
            raise invalid_field(names.max_new_tokens, f"must be <= {settings.max_new_tokens}")
        if max_new > room:
            raise ContextLengthError(
                names.max_new_tokens,
                f"{n_prompt} prompt tokens + {max_new} new tokens exceed the context length "
                f"{context_length}",
                n_prompt=n_prompt,
                max_new=max_new,
                context=context_length,
            )
    if decoding.min_tokens > max_new:
        raise invalid_field(
            names.min_tokens,
            f"{decoding.min_tokens} is more than the {max_new} tokens this request may "
            f"generate ({names.max_new_tokens})",
        )
    stop = check_stop(decoding.stop, settings, names.stop)
    seed = decoding.seed
    if decoding.do_sample and seed is None:
        # Reported back in details so a sampled answer can be reproduced.
        seed = secrets.randbits(31)
    params = SamplingParams(
        max_new_tokens=max_new,
        do_sample=decoding.do_sample,
        temperature=decoding.temperature,
        top_k=decoding.top_k,
        top_p=decoding.top_p,
        min_p=decoding.min_p,
        repetition_penalty=decoding.repetition_penalty,
        seed=seed,
        stop=stop,
        logprobs=decoding.logprobs,
        top_logprobs=decoding.top_logprobs,
        prompt_logprobs=decoding.prompt_logprobs,
        ignore_eos=decoding.ignore_eos,
        stop_token_ids=decoding.stop_token_ids,
        min_tokens=decoding.min_tokens,
        allowed_token_ids=decoding.allowed_token_ids,
    )
    return GenerationRequest(
        request_id=request_id,
        prompt_ids=prompt_ids,
        params=params,
        adapter_id=adapter_id,
        deadline=time.monotonic() + settings.request_timeout,
    )


async def events(
    engine: GenerationEngine, request: GenerationRequest, metrics: ServerMetrics
) -> AsyncGenerator[GenerationEvent, None]:
    """The engine's events for `request`, timed. Closing this closes the engine's iterator,
    which cancels the request (the client went away)."""
    timer = RequestTimer(metrics, request.adapter_id)
    observer = observability.GenerationObserver(request, engine.stats().loaded_adapters)
    stream = engine.generate(request)
    try:
        async for event in stream:
            if isinstance(event, TokenEvent):
                timer.token()
                observer.token()
            else:
                timer.finish(event.reason, event.prompt_tokens, event.generated_tokens)
                observer.finish(event)
                if event.reason == "deadline" and event.generated_tokens == 0:
                    # Expired before its first token (queue wait, adapter load): nothing to
                    # return, so a 504. With tokens, the partial answer is a 200 whose
                    # finish_reason says "deadline" ("length" in the OpenAI shape).
                    raise APIError(
                        504,
                        "the request timed out before its first token "
                        "(FLORA_REQUEST_TIMEOUT covers queueing and generation)",
                        type="timeout_error",
                    )
            yield event
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def collect(
    engine: GenerationEngine,
    request: GenerationRequest,
    metrics: ServerMetrics,
    receive: Receive | None = None,
) -> Collected:
    """Run `request` to the end. With `receive` (the ASGI receive channel, its body already
    read), a client that disconnects cancels the request instead of leaving it running."""
    return await _unless_disconnected(_collect(engine, request, metrics), receive)


async def _unless_disconnected(work: Awaitable[T], receive: Receive | None) -> T:
    """`work`'s result; with `receive`, a client that disconnects first cancels `work`
    (which closes the engine's iterator: the request leaves the engine) and gets a 499."""
    if receive is None:
        return await work
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            # Cancelling runs `events`' finally, which closes the engine's iterator.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise APIError(499, "the client closed the connection", type="client_closed_request")
    return task.result()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _collect(
    engine: GenerationEngine, request: GenerationRequest, metrics: ServerMetrics
) -> Collected:
    out = Collected()
    async for event in events(engine, request, metrics):
        if isinstance(event, TokenEvent):
            out.tokens.append(event)
        else:
            out.finish = event
    if out.finish is None:
        raise APIError(
            500, "the engine ended the request without finishing it", type="server_error"
        )
    return out


async def open_stream(
    engine: GenerationEngine,
    request: GenerationRequest,
    metrics: ServerMetrics,
    receive: Receive,
) -> tuple[GenerationEvent, AsyncGenerator[GenerationEvent, None]]:
    """Start generating and wait for the first event, so that errors (unknown adapter, full
    queue) become a status code instead of an error inside a 200 stream. A client that
    disconnects meanwhile (in the queue, during a long prefill) cancels the request, as
    `collect` does; once the stream runs, the response watches for it."""
    stream = events(engine, request, metrics)
    try:
        first = await _unless_disconnected(anext(stream), receive)
    except BaseException:
        await stream.aclose()
        raise
    return first, stream


def sse(data: object) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def sse_error(exc: Exception) -> bytes:
    """An error after the stream began: the status is already 200, so say it in an event."""
    err = engine_error_to_api(exc) if isinstance(exc, EngineError) else exc
    if isinstance(err, APIError):
        return sse(error_body(err.type, err.message))
    return sse(error_body("server_error", "internal server error"))
