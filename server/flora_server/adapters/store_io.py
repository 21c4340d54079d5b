"""Where store I/O runs: a bounded thread pool of its own, with a timeout.

Store calls block (a file read, an S3 round trip). Run on asyncio's default executor, they
share its few threads (`min(32, cpus + 4)`) with everything else handlers push off the loop,
tokenizing included: with the store stalled, a handful of adapter requests, each holding a
thread for the S3 client's whole retry budget, stopped requests for the base model too. So
every store call made for a request goes through the store's `StoreExecutor`:

- its own `workers` threads: a stalled store holds those and nothing else;
- `timeout` bounds how long a request waits, for a worker and for the answer; past it the
  request gets `StoreUnavailableError` (503 + Retry-After) instead of queueing behind stuck
  calls. The abandoned call finishes on its worker in the background (the S3 client's own
  connect/read timeouts end it); a call still queued is dropped and never runs.

Calls whose length depends on the data (an upload, which also validates) pass
`bounded=False`: the wait for a worker is still bounded, the transfer is not (each network
read is, by the client's read timeout).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class StoreError(Exception):
    """Base class of store errors."""


class StoreUnavailableError(StoreError):
    """The store could not be reached or did not answer in time (S3 endpoint down, a stalled
    connection, every store worker busy): nothing is wrong with the request, and it may
    succeed later. The API answers 503 with Retry-After.

    `reason` is what a client may be told: a short cause such as the endpoint error's class
    (`EndpointConnectionError`) or S3's error code, never an address, key or credential.
    `str(exc)` is the full story, for the log."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


DEFAULT_WORKERS = 8
DEFAULT_TIMEOUT = 10.0


class StoreExecutor:
    """A thread pool for store calls made on behalf of requests; see the module docstring."""

    def __init__(self, workers: int = DEFAULT_WORKERS, timeout: float = DEFAULT_TIMEOUT) -> None:
        if workers < 1 or timeout <= 0:
            raise ValueError("workers must be >= 1 and timeout > 0")
        self.workers = workers
        self.timeout = timeout
        # Threads start on demand, so an idle store costs none.
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapter-store")

    async def run(self, fn: Callable[..., T], /, *args: Any, bounded: bool = True) -> T:
        """`fn(*args)` on a store worker (with the caller's context variables), awaited.
        Raises what `fn` raises, or `StoreUnavailableError` when no worker frees up within
        `timeout` or, if `bounded`, when the call has not returned within it."""
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        started = threading.Event()

        def job() -> T:
            started.set()
            return context.run(fn, *args)

        try:
            future = self._pool.submit(job)
        except RuntimeError as exc:  # shut down
            raise StoreUnavailableError(
                "the store executor is shut down", reason="the server is shutting down"
            ) from exc
        result = asyncio.wrap_future(future, loop=loop)
        try:
            done, _ = await asyncio.wait({result}, timeout=self.timeout)
            # An unbounded call that got its worker runs to its end.
            if done or (not bounded and not future.cancel()):
                return await result
            raise self._timed_out(started.is_set())
        finally:
            # Cancels a call still queued (it never runs); a running one cannot be stopped
            # and its late result is dropped.
            result.cancel()

    def _timed_out(self, started: bool) -> StoreUnavailableError:
        if started:
            reason = f"no answer within {self.timeout:g} s"
        else:
            reason = f"all {self.workers} store workers are busy (waited {self.timeout:g} s)"
        return StoreUnavailableError(f"adapter store call: {reason}", reason=reason)

    def shutdown(self) -> None:
        """Refuse new calls and drop queued ones; running calls finish on their own."""
        self._pool.shutdown(wait=False, cancel_futures=True)
