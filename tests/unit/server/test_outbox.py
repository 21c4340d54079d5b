"""The worker's `Outbox` (`engine/requests.py`): an iteration's events reach each handler's
queue in the order emitted, with one wake-up of each event loop, not one per event."""

from __future__ import annotations

import asyncio

from flora_server.engine.protocol import GenerationRequest, SamplingParams
from flora_server.engine.requests import Outbox, RequestHandle


class CountingLoop:
    """An event loop stand-in that runs what it is handed at once and counts the hand-overs."""

    def __init__(self, closed: bool = False) -> None:
        self.calls = 0
        self.closed = closed

    def call_soon_threadsafe(self, callback, *args) -> None:  # type: ignore[no-untyped-def]
        if self.closed:
            raise RuntimeError("Event loop is closed")
        self.calls += 1
        callback(*args)


def handle(loop: CountingLoop, outbox: Outbox, name: str) -> RequestHandle:
    request = GenerationRequest(name, [1, 2], SamplingParams(), None)
    return RequestHandle(request, loop, asyncio.Queue(), 4, outbox)  # type: ignore[arg-type]


def test_one_hand_over_per_loop_per_flush_in_emit_order() -> None:
    outbox, a_loop, b_loop = Outbox(), CountingLoop(), CountingLoop()
    a, b, c = handle(a_loop, outbox, "a"), handle(a_loop, outbox, "b"), handle(b_loop, outbox, "c")
    for step in range(3):
        for h in (a, b, c):
            h.emit(f"{h.request.request_id}{step}")  # type: ignore[arg-type]
    assert a.queue.empty() and a_loop.calls == 0  # nothing before the flush
    outbox.flush()
    assert (a_loop.calls, b_loop.calls) == (1, 1)
    assert [a.queue.get_nowait() for _ in range(3)] == ["a0", "a1", "a2"]
    assert [c.queue.get_nowait() for _ in range(3)] == ["c0", "c1", "c2"]
    outbox.flush()  # nothing pending: no wake-up
    assert (a_loop.calls, b_loop.calls) == (1, 1)


def test_a_closed_loop_marks_its_requests_cancelled() -> None:
    outbox = Outbox()
    gone, live = (
        handle(CountingLoop(closed=True), outbox, "gone"),
        handle(CountingLoop(), outbox, "live"),
    )
    gone.emit("x")  # type: ignore[arg-type]
    live.emit("y")  # type: ignore[arg-type]
    outbox.flush()
    assert gone.cancelled and not live.cancelled and live.queue.get_nowait() == "y"
