"""`BatchEngine`: the one-forward-per-batch worker shared by the image classifier and the
text encoder (no decoding loop: every request is answered by a single forward).

Worker loop, one iteration:
1. wait for a request; then keep collecting for up to `max_wait` seconds or until
   `max_batch_size` rows are queued (a request is one row per image or text);
2. apply adapter invalidations; drop cancelled and expired requests;
3. resolve each request's adapter to a device slot (`AdapterCache.lookup`, as the LLM engine
   does; a miss starts a background load and only that request waits) and pin it;
4. `run_batch`: one forward over every admitted row with per-row routing through
   `flora.serving`, then hand each request its result (or its own error). A forward that
   raises is retried one request at a time, so only the request that causes it fails.

Subclasses implement `run_batch` and `warm_up`; they run on the worker thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from flora_server.engine.adapter_cache import AdapterCache
from flora_server.engine.hooks import EngineMetrics, NullEngineMetrics
from flora_server.engine.policy import Mode
from flora_server.engine.protocol import (
    AdapterSource,
    DeadlineExceededError,
    EngineError,
    EngineNotReadyError,
    EngineStats,
    QueueFullError,
    RequestFailedError,
)
from flora_server.engine.runtime import AdapterRuntime
from flora_server.engine.worker_thread import WorkerThreadMixin

log = logging.getLogger(__name__)
_WAKE = object()


@dataclass
class BatchJob:
    """One request: `inputs` are its rows (decoded images or texts); `options` is whatever
    the subclass needs (top_k, what to compute); `result` is one value per job."""

    adapter_id: str | None
    inputs: list[Any]
    options: Any
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    submitted: float = field(default_factory=time.monotonic)
    deadline: float | None = None
    slot: int | None = None
    adapter_sha256: str | None = None  # of the stored bytes on `slot` (set at admission)

    def resolve(self, value: Any) -> None:
        """Hand `value` (a result or an exception) to the awaiting handler."""

        def _set() -> None:
            if self.future.done():
                return
            if isinstance(value, BaseException):
                self.future.set_exception(value)
            else:
                self.future.set_result(value)

        # A closed loop means nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_set)


class BatchEngine(WorkerThreadMixin):
    """Base class; see the module docstring. `kind` names the model kind it serves."""

    kind = ""

    def __init__(
        self,
        *,
        model_name: str,
        runtime: AdapterRuntime,
        source: AdapterSource,
        max_batch_size: int = 32,
        max_queue: int = 256,
        max_slots: int = 8,
        host_cache_bytes: int = 1 << 30,
        max_wait: float = 0.005,
        context_length: int = 0,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.model_name = model_name
        self.context_length = context_length
        self.max_slots = max_slots
        self.runtime = runtime
        self._max_batch_size = max_batch_size
        self._max_queue = max_queue
        self._max_wait = max_wait
        self._metrics = metrics or NullEngineMetrics()
        self._inbox: queue.Queue = queue.Queue()
        self.cache = AdapterCache(
            source,
            runtime,
            max_slots=max_slots,
            host_bytes=host_cache_bytes,
            metrics=self._metrics,
            on_loaded=self._wake,
        )
        self._lock = threading.Lock()
        self._waiting = 0
        self._stats = EngineStats(0, 0, (), (), max_slots, "idle")
        self._init_worker(f"flora-{self.kind}")

    # -- engine interface (same as GenerationEngine where it applies) ---------------------

    async def submit(
        self,
        adapter_id: str | None,
        inputs: list[Any],
        options: Any = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Queue one request and await its result. Raises `QueueFullError` at once when the
        queue is full, the request's own `EngineError` otherwise."""
        result, _ = await self.serve(adapter_id, inputs, options, timeout=timeout)
        return result

    async def serve(
        self,
        adapter_id: str | None,
        inputs: list[Any],
        options: Any = None,
        *,
        timeout: float | None = None,
    ) -> tuple[Any, str | None]:
        """`submit`, and the sha256 of the stored adapter bytes that served the request
        (None for the base model)."""
        if not self.ready:
            raise EngineNotReadyError("the engine is starting or shutting down")
        with self._lock:
            if self._waiting >= self._max_queue:
                raise QueueFullError(retry_after=1.0)
            self._waiting += 1
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        job = BatchJob(adapter_id, inputs, options, loop, loop.create_future(), deadline=deadline)
        self._inbox.put(job)
        try:
            return await job.future, job.adapter_sha256
        finally:
            if not job.future.done():  # the handler was cancelled (client gone)
                job.future.cancel()

    async def preload(self, adapter_id: str) -> None:
        """Pull `adapter_id` through the caches onto a device slot (no forward)."""
        await self.submit(adapter_id, [])

    def stats(self) -> EngineStats:
        with self._lock:
            stats, waiting = self._stats, self._waiting
        return EngineStats(
            running=stats.running,
            waiting=waiting,
            running_adapters=stats.running_adapters,
            waiting_adapters=stats.waiting_adapters,
            max_slots=self.max_slots,
            mode=stats.mode,
            loaded_adapters=self.cache.device_adapters(),
            host_adapters=self.cache.host_adapters(),
        )

    def check_adapter(self, adapter: Any) -> None:
        """Raise ValueError unless this engine can serve `adapter` (called at upload, so a
        misfit is a 4xx there rather than a 500 at first use)."""
        self.runtime.check(adapter)

    def invalidate_adapter(self, adapter_id: str) -> None:
        self.cache.invalidate(adapter_id)
        self._wake()

    def fail_in_flight(self, reason: str) -> None:
        """Nothing to do: batch requests do not stream, so the server's own shutdown answers
        or cancels what is still waiting (there is no half-written body to end)."""

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting; queued requests are still answered for up to `timeout` seconds."""
        self._accepting = False
        self._stopping = True
        self._wake()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
        self.cache.close()

    # -- subclass API ------------------------------------------------------------------

    def warm_up(self) -> None:
        """One small forward before reporting ready (worker thread)."""

    def run_batch(self, jobs: list[BatchJob]) -> list[Any]:
        """One forward for `jobs` (each with `slot` resolved): a result or an exception
        per job, in order."""
        raise NotImplementedError

    # -- worker thread -----------------------------------------------------------------

    def _wake(self) -> None:
        self._inbox.put(_WAKE)

    def _run(self) -> None:
        pending: deque[BatchJob] = deque()
        try:
            with torch.inference_mode():
                self.warm_up()
                self._ready = True
                while not (self._stopping and not pending and self._inbox.empty()):
                    self._iterate(pending)
        except BaseException:
            log.exception("engine worker died")
            self._crashed = True
            for job in pending:
                job.resolve(RequestFailedError("engine worker died"))
            raise
        finally:
            self._ready = False
            self._drain_after_stop()

    def _drain_after_stop(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, BatchJob):
                item.resolve(EngineNotReadyError("the server is shutting down"))

    def _take(self, pending: deque[BatchJob], timeout: float | None) -> None:
        """Move inbox items to `pending`, waiting up to `timeout` for the first (None: do
        not wait)."""
        try:
            item = self._inbox.get(timeout=timeout) if timeout else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, BatchJob):
                pending.append(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _queued_rows(self, pending: deque[BatchJob]) -> int:
        return sum(len(job.inputs) for job in pending)

    def _iterate(self, pending: deque[BatchJob]) -> None:
        had_pending = bool(pending)
        self._take(pending, 0.5 if not pending else 0.05)
        if pending and not had_pending:
            # Collect for a few ms so concurrent requests share the forward.
            start = pending[0].submitted
            while self._queued_rows(pending) < self._max_batch_size:
                left = start + self._max_wait - time.monotonic()
                if left <= 0:
                    break
                self._take(pending, left)
        self.cache.apply_invalidations()
        batch = self._admit(pending)
        if batch:
            self._forward(batch)
        self._publish(pending, batch)

    def _admit(self, pending: deque[BatchJob]) -> list[BatchJob]:
        """FIFO, up to `max_batch_size` rows (a larger request runs alone); requests whose
        adapter is still loading stay queued without blocking the others."""
        now = time.monotonic()
        batch: list[BatchJob] = []
        rows = 0
        for job in list(pending):
            if job.future.cancelled() or (job.deadline is not None and now > job.deadline):
                pending.remove(job)
                self._done_waiting()
                job.resolve(DeadlineExceededError("the request timed out in the queue"))
                continue
            if batch and rows + len(job.inputs) > self._max_batch_size:
                break
            if job.adapter_id is not None:
                try:
                    slot = self.cache.lookup(job.adapter_id)
                except Exception as exc:
                    # This request's failure (its adapter cannot load), not the worker's.
                    pending.remove(job)
                    self._done_waiting()
                    if not isinstance(exc, EngineError):
                        log.exception("admitting a request for %s failed", job.adapter_id)
                        exc = RequestFailedError(f"{type(exc).__name__}: {exc}")
                    job.resolve(exc)
                    continue
                if slot is None:
                    continue
                self.cache.pin(slot)  # later lookups in this batch must not evict it
                job.slot = slot
                job.adapter_sha256 = self.cache.slot_sha256(slot)
            pending.remove(job)
            self._done_waiting()
            if not job.inputs:  # `preload`: the adapter is on a slot now, nothing to run
                if job.slot is not None:
                    self.cache.unpin(job.slot)
                job.resolve(None)
                continue
            batch.append(job)
            rows += len(job.inputs)
        return batch

    def _done_waiting(self) -> None:
        with self._lock:
            self._waiting -= 1

    def _forward(self, batch: list[BatchJob]) -> None:
        started = time.monotonic()
        rows = sum(len(job.inputs) for job in batch)
        mode: Mode = "batched" if any(job.slot is not None for job in batch) else "base"
        try:
            results = self._run_isolated(batch)
        finally:
            for job in batch:
                if job.slot is not None:
                    self.cache.unpin(job.slot)
        seconds = time.monotonic() - started
        self._metrics.on_step(mode, rows, seconds)
        now = time.monotonic()
        for job, result in zip(batch, results, strict=True):
            ok = not isinstance(result, BaseException)
            self._metrics.on_finish(
                job.adapter_id, "stop" if ok else "error", len(job.inputs), 0, now - job.submitted
            )
            job.resolve(result)
        with self._lock:
            self._stats = EngineStats(
                rows, self._stats.waiting, self._adapters(batch), (), self.max_slots, mode
            )

    def _run_isolated(self, batch: list[BatchJob]) -> list[Any]:
        """`run_batch(batch)`; if the batched forward raises, each request runs alone so
        that the failure stays with the request that causes it."""
        try:
            results = self.run_batch(batch)
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for {len(batch)} requests")
            return results
        except Exception as exc:
            log.exception("batch forward failed")
            if len(batch) == 1:
                return [RequestFailedError(f"the forward failed: {exc}")]
        return [self._run_isolated([job])[0] for job in batch]

    @staticmethod
    def _adapters(jobs: Any) -> tuple[str, ...]:
        return tuple(sorted({j.adapter_id for j in jobs if j.adapter_id is not None}))

    def _publish(self, pending: deque[BatchJob], batch: list[BatchJob]) -> None:
        with self._lock:
            stats = self._stats
            self._stats = EngineStats(
                0,
                len(pending),
                (),
                self._adapters(pending),
                self.max_slots,
                stats.mode if batch else "idle",
            )
            waiting = self._waiting
        self._metrics.on_queue(waiting, 0)
