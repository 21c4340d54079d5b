"""Per-request plumbing between the event loop and the worker thread.

`RequestHandle` is shared by both threads: the worker emits events into its `Outbox`, which
hands each event loop an iteration's events with one `loop.call_soon_threadsafe` into the
handles' asyncio.Queues; the handler side sets `cancelled`. `EventStream` is what
`generate()` returns. `RowState` is the worker's own per-row state (never touched by the
event loop).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from flora_server.engine.protocol import (
    FinishEvent,
    GenerationEvent,
    GenerationRequest,
    Logprob,
)
from flora_server.engine.text import TextStream


class Outbox:
    """The events the worker emits in one iteration, handed to each event loop at once.

    Every `call_soon_threadsafe` writes to the loop's self-pipe to wake it: one per token
    was a system call per row per step. The worker calls `flush` after each iteration;
    events reach the handlers in the order emitted. Worker thread only."""

    def __init__(self) -> None:
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, Any]]] = {}

    def add(self, handle: RequestHandle, item: GenerationEvent | BaseException) -> None:
        self._pending.setdefault(handle.loop, []).append((handle, item))

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                for handle, _ in items:
                    handle.cancelled = True


def _deliver(items: list[tuple[RequestHandle, Any]]) -> None:
    for handle, item in items:
        handle.queue.put_nowait(item)


@dataclass(eq=False)
class RequestHandle:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    max_new_tokens: int
    outbox: Outbox  # the worker's: events reach `queue` when it flushes
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the handler side; a plain bool store is atomic

    def emit(self, item: GenerationEvent | BaseException) -> None:
        """Deliver an event or an error to the handler (worker thread)."""
        self.outbox.add(self, item)

    def expired(self, now: float) -> bool:
        deadline = self.request.deadline
        return deadline is not None and now >= deadline


class EventStream:
    """Async iterator over one request's events. Closing it early (`aclose`, task
    cancellation or garbage collection) marks the request cancelled; the worker drops it at
    its next step."""

    def __init__(self, handle: RequestHandle, wake: Callable[[], None]) -> None:
        self._handle = handle
        self._wake = wake
        self._done = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> GenerationEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._handle.queue.get()
        except BaseException:  # CancelledError: the client went away
            self._cancel()
            raise
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if isinstance(item, FinishEvent):
            self._done = True
        return item

    async def aclose(self) -> None:
        self._cancel()

    def _cancel(self) -> None:
        if not self._done:
            self._done = True
            self._handle.cancelled = True
            self._wake()

    def __del__(self) -> None:
        if not self._done:
            self._handle.cancelled = True


@dataclass(eq=False)
class RowState:
    """The worker's state for one running request."""

    handle: RequestHandle
    slot: int | None
    text: TextStream
    generator: torch.Generator | None
    seen: list[int]  # prompt + generated ids, for the repetition penalty
    generated: list[int] = field(default_factory=list)  # EOS included
    first_token_at: float | None = None
    finished: str | None = None  # the finish reason ("error" on failure) once done
    prompt_logprobs: tuple[Logprob, ...] = ()  # filled at prefill when the request asks
    adapter_sha256: str | None = None  # of the stored bytes on the row's slot at admission

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request

    @property
    def adapter_id(self) -> str | None:
        return self.handle.request.adapter_id
