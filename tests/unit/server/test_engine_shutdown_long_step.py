"""Shutdown while the worker is inside a long step (a big prefill on a CPU): the shutdown
timeout's errors reach every request at once, not after the step, and the engine's
shutdown returns only once the worker has stopped (a daemon thread still inside a torch op
when the interpreter exits aborts the process). Both engines, on the tiny Llama."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from test_engine import collect, greedy, make_engine, run

from flora_server.engine.protocol import EngineNotReadyError, GenerationRequest

pytestmark = pytest.mark.timeout(120)

STEP_SECONDS = 6.5  # longer than the 5 s the engine once waited for its worker


def slow_steps(engine, entered: threading.Event) -> None:
    """Make every step sleep STEP_SECONDS first (a stand-in for a long prefill)."""
    stepper = engine._stepper  # type: ignore[attr-defined]
    step = stepper.step

    def slow(*args, **kwargs):
        entered.set()
        time.sleep(STEP_SECONDS)
        return step(*args, **kwargs)

    stepper.step = slow


def test_errors_arrive_during_a_long_step_and_shutdown_waits_for_it(engine_kind) -> None:
    engine = make_engine({}, kind=engine_kind)
    entered = threading.Event()

    async def main():
        slow_steps(engine, entered)
        running = asyncio.ensure_future(collect(engine, GenerationRequest("a", [5, 6], greedy(4))))
        await asyncio.to_thread(entered.wait, 10)
        queued = asyncio.ensure_future(collect(engine, GenerationRequest("b", [7], greedy(4))))
        await asyncio.sleep(0.1)
        failed_at = time.monotonic()
        engine.fail_in_flight("the server is shutting down")
        outcomes = await asyncio.gather(running, queued, return_exceptions=True)
        waited = time.monotonic() - failed_at
        started = time.monotonic()
        await engine.shutdown(0.1)
        return outcomes, waited, time.monotonic() - started

    outcomes, waited, shutdown_took = run(main())
    for outcome in outcomes:
        assert isinstance(outcome, EngineNotReadyError), outcome
        assert "shutting down" in str(outcome)
    assert waited < STEP_SECONDS / 2  # delivered at once, not after the step
    assert not engine._thread.is_alive()  # type: ignore[attr-defined]
    assert shutdown_took > 1.0  # it waited for the step to end
