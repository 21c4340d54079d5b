"""`LLMEngine`: the `GenerationEngine` for causal LMs. One worker thread owns the model, the
device and the adapter slots; the event loop only enqueues requests and awaits events.

Worker loop, one iteration:
1. take new requests from the inbox (blocking briefly only when there is nothing to do);
2. apply adapter invalidations; drop cancelled and expired waiting requests;
3. admit waiting requests in FIFO order while the batch has room and their adapter is on a
   device slot (`AdapterCache.lookup`; a miss starts a background load and the request
   keeps waiting while the others proceed);
4. `Stepper.step`: choose merged/batched mode (engine/policy.py), decode the running rows,
   prefill the admitted ones, emit events, drop finished rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch

from flora_server.engine.adapter_cache import AdapterCache
from flora_server.engine.constraints import ConstraintSpec, GrammarCompiler, TokenConstraint
from flora_server.engine.hooks import EngineMetrics, NullEngineMetrics
from flora_server.engine.protocol import (
    ENGINE_DEAD_EXIT,
    AdapterSource,
    EngineError,
    EngineNotReadyError,
    EngineStats,
    FinishEvent,
    GenerationEvent,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
)
from flora_server.engine.requests import EventStream, Outbox, RequestHandle, RowState
from flora_server.engine.runtime import (
    AdapterRuntime,
    build_serving_runtime,
)
from flora_server.engine.sampling import make_generator
from flora_server.engine.stepper import Stepper
from flora_server.engine.text import TextStream
from flora_server.engine.worker_thread import WorkerThreadMixin

log = logging.getLogger(__name__)
_WAKE = object()
# How long shutdown waits for the worker's current step before calling it hung.
STEP_WAIT_SECONDS = 60


class LLMEngine(WorkerThreadMixin):
    """Continuous-batching engine over a `flora.models.LoadedModel` of kind "causal-lm"."""

    kind = "causal-lm"

    def __init__(
        self,
        loaded: Any,
        source: AdapterSource,
        *,
        max_batch_size: int = 32,
        max_queue: int = 256,
        max_slots: int = 8,
        host_cache_bytes: int = 1 << 30,
        max_new_tokens_cap: int = 1024,
        merge_after_steps: int | None = 4,
        loader_threads: int = 2,
        factor_dtype: str = "auto",
        runtime: AdapterRuntime | None = None,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.model_name: str = loaded.name
        self.context_length: int = int(loaded.context_length)
        self.max_slots = max_slots
        self._model = loaded.model
        self._tokenizer = loaded.preprocessor
        self._max_batch_size = max_batch_size
        self._max_queue = max_queue
        self._max_new_tokens_cap = max_new_tokens_cap
        self._metrics = metrics or NullEngineMetrics()
        self._runtime = runtime or build_serving_runtime(self._model, max_slots, factor_dtype)
        self._inbox: queue.Queue = queue.Queue()
        self.cache = AdapterCache(
            source,
            self._runtime,
            max_slots=max_slots,
            host_bytes=host_cache_bytes,
            loader_threads=loader_threads,
            metrics=self._metrics,
            on_loaded=self._wake,
        )
        self._stepper = self._make_stepper(
            eos_token_ids(self._model, self._tokenizer), merge_after_steps
        )
        self._device = next(self._model.parameters()).device
        self._lock = threading.Lock()
        self._outbox = Outbox()  # the worker's events, handed over once per iteration
        self._waiting_count = 0  # inbox + worker's waiting list
        self._stats = EngineStats(0, 0, (), (), max_slots, "idle")
        self._grammar_compiler: GrammarCompiler | None = None  # built on first use
        self._grammar_lock = threading.Lock()
        self._init_worker("flora-engine")
        self._abort = False
        self._fail_reason: str | None = None  # set by fail_in_flight
        # The requests' handles, for `fail_in_flight` to reach from another thread (weak: a
        # handle goes once neither its stream nor the worker holds it).
        self._live: weakref.WeakSet[RequestHandle] = weakref.WeakSet()

    def _make_stepper(self, eos_ids: set[int], merge_after_steps: int | None) -> Stepper:
        """The object that runs the steps (engine v2 substitutes its paged one)."""
        return Stepper(
            self._model, self._runtime, self.cache, eos_ids, self._metrics, merge_after_steps
        )

    # -- GenerationEngine ------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if not self.ready:
            raise EngineNotReadyError("the engine is starting or shutting down")
        max_new = self._max_new_tokens(request)
        with self._lock:
            if self._waiting_count >= self._max_queue:
                raise QueueFullError(retry_after=1.0)
            self._waiting_count += 1
        handle = RequestHandle(
            request, asyncio.get_running_loop(), asyncio.Queue(), max_new, self._outbox
        )
        with self._lock:  # `fail_in_flight` copies the set from another thread
            self._live.add(handle)
        self._inbox.put(handle)
        return EventStream(handle, self._wake)

    async def tokenize(self, text: str) -> list[int]:
        return await asyncio.to_thread(self._encode, text)

    async def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        return await asyncio.to_thread(
            self._tokenizer.apply_chat_template,
            list(messages),
            tokenize=False,
            add_generation_prompt=True,
        )

    async def compile_constraint(self, spec: ConstraintSpec) -> TokenConstraint:
        """A fresh structured-output constraint for one request (compiled off the event
        loop; ConstraintError for a schema that cannot be compiled)."""
        return await asyncio.to_thread(self._grammar().compile, spec)

    def _grammar(self) -> GrammarCompiler:
        with self._grammar_lock:
            if self._grammar_compiler is None:
                vocab = self._model.get_output_embeddings().weight.shape[0]
                self._grammar_compiler = GrammarCompiler(
                    self._tokenizer, vocab, self._stepper.eos_ids
                )
            return self._grammar_compiler

    def stats(self) -> EngineStats:
        with self._lock:
            stats, waiting = self._stats, self._waiting_count
        return dataclasses.replace(
            stats,
            waiting=waiting,
            max_slots=self.max_slots,
            loaded_adapters=self.cache.device_adapters(),
            host_adapters=self.cache.host_adapters(),
        )

    def check_adapter(self, adapter: Any) -> None:
        """At upload: what the runtime can serve, and (flora's runtime) an update whose
        outputs stay finite (`ServingModel.check_output_range`): one that overflows would
        be stored and then fail every request with non-finite logits. Loading for a request
        checks only what the runtime needs, so a row that still overflows fails alone."""
        from flora.serving.model import ServingModel

        if isinstance(self._runtime, ServingModel):
            self._runtime.check(adapter, output_range=True)
        else:
            self._runtime.check(adapter)

    def invalidate_adapter(self, adapter_id: str) -> None:
        self.cache.invalidate(adapter_id)
        self._wake()

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, let running and queued requests finish for up to `timeout`
        seconds, then cancel what is left and stop the worker."""
        self._accepting = False
        self._stopping = True
        self._wake()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
            if self._thread.is_alive():
                self._abort = True
                self._wake()
                await asyncio.to_thread(self._join_after_abort, self._thread)
        self.cache.close()

    @staticmethod
    def _join_after_abort(thread: threading.Thread) -> None:
        """Wait for the worker, which stops after its current step. The process must not
        exit under a step: a daemon thread inside a torch op at interpreter exit aborts
        the process (SIGABRT) instead of a clean exit. A step still running after
        `STEP_WAIT_SECONDS` is hung (a stuck kernel): the process ends at once with the
        dead-engine status rather than never."""
        deadline = time.monotonic() + STEP_WAIT_SECONDS
        while thread.is_alive():
            thread.join(min(5.0, max(0.0, deadline - time.monotonic())))
            if not thread.is_alive():
                return
            if time.monotonic() >= deadline:
                log.critical(
                    "shutdown: the engine's step did not end in %d s: exiting now",
                    STEP_WAIT_SECONDS,
                )
                logging.shutdown()
                os._exit(ENGINE_DEAD_EXIT)
            log.warning("shutdown: waiting for the engine's current step to end")

    def fail_in_flight(self, reason: str) -> None:
        """End every running and queued request now with an `EngineNotReadyError(reason)`
        (a 503, or a final error event in a stream that already began), and any that
        arrive later. The server calls it when its shutdown timeout expires, so that
        streams still running end with an error event instead of being cut off. The
        errors are delivered from here, at once, not by the worker after its current step
        (a long prefill step would outlast the server's last grace period); the worker
        then drops the rows."""
        self._fail_reason = reason
        self._wake()
        with self._lock:
            handles = list(self._live)
        for handle in handles:
            with contextlib.suppress(RuntimeError):  # its event loop is closed
                handle.loop.call_soon_threadsafe(
                    handle.queue.put_nowait, EngineNotReadyError(reason)
                )

    # -- helpers for the event-loop side -----------------------------------------------

    def _wake(self) -> None:
        self._inbox.put(_WAKE)

    def _encode(self, text: str) -> list[int]:
        bos = getattr(self._tokenizer, "bos_token", None)
        add_special = not (bos and text.startswith(bos))
        return list(self._tokenizer.encode(text, add_special_tokens=add_special))

    def _max_new_tokens(self, request: GenerationRequest) -> int:
        """min(requested, server cap, room left in the context); rejects unusable prompts."""
        n_prompt = len(request.prompt_ids)
        if n_prompt == 0:
            raise InvalidRequestError("the prompt is empty")
        vocab = self._stepper.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in request.params.allowed_token_ids):
            raise InvalidRequestError(
                f"allowed_token_ids must be in [0, {vocab})", param="allowed_token_ids"
            )
        room = self.context_length - n_prompt
        if room <= 0:
            raise InvalidRequestError(
                f"the prompt has {n_prompt} tokens; the context length is {self.context_length}"
            )
        return max(1, min(request.params.max_new_tokens, self._max_new_tokens_cap, room))

    # -- worker thread -----------------------------------------------------------------

    def _run(self) -> None:
        waiting: deque[RequestHandle] = deque()
        try:
            with torch.inference_mode():
                self._stepper.warm_up(token_id=0)
                self._ready = True
                while not self._finished(waiting):
                    self._iterate(waiting)
                    self._outbox.flush()
        except BaseException:
            log.exception("engine worker died")
            self._crashed = True
            self._stepper.fail_all(RuntimeError("engine worker died"))
            for handle in waiting:
                handle.emit(RequestFailedError("engine worker died"))
            raise
        finally:
            self._outbox.flush()  # the last iteration's, the abort's or the failures'
            self._ready = False

    def _finished(self, waiting: deque[RequestHandle]) -> bool:
        if self._abort:
            for handle in waiting:
                self._finish_waiting(handle, "cancelled")
            waiting.clear()
            for row in self._stepper.rows:
                self._stepper.finish(row, "cancelled")
            self._stepper.drop_finished()
            return True
        return self._stopping and not waiting and not self._stepper.busy

    def _iterate(self, waiting: deque[RequestHandle]) -> None:
        idle = not self._stepper.busy
        self._drain_inbox(waiting, block=idle, timeout=0.5 if not waiting else 0.02)
        if self._fail_reason is not None:
            self._fail_everything(waiting, EngineNotReadyError(self._fail_reason))
        self.cache.apply_invalidations()
        self._expire_waiting(waiting)
        admitted = self._admit(waiting)
        if self._stepper.busy or admitted:
            self._step(admitted, [h.request.adapter_id for h in waiting])
        else:
            self._stepper.mode = "idle"
        self._publish_stats(waiting)

    def _step(self, admitted: list[RowState], waiting: list[str | None]) -> None:
        """`Stepper.step`, with failures kept to the rows they belong to. A failing prefill
        is already retried row by row inside `step`. A decode forward that raises leaves
        the culprit unknown and the shared KV cache half-extended: the running rows fail;
        the rows admitted in this iteration, not yet run, are prefilled on their own."""
        try:
            self._stepper.step(admitted, waiting)
            return
        except Exception as exc:
            log.exception("decode step failed; failing the running requests")
            self._stepper.fail_all(exc)
        fresh = [row for row in admitted if row.finished is None]
        if not fresh:
            return
        try:
            self._stepper.step(fresh, waiting)
        except Exception as exc:
            log.exception("prefill after a failed decode step failed")
            self._stepper.fail_all(exc)
            self._stepper.fail(fresh, exc)

    def _drain_inbox(self, waiting: deque[RequestHandle], block: bool, timeout: float) -> None:
        items = []
        if block:
            try:
                items.append(self._inbox.get(timeout=timeout))
            except queue.Empty:
                return
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        waiting.extend(item for item in items if item is not _WAKE)

    def _fail_everything(self, waiting: deque[RequestHandle], exc: EngineError) -> None:
        self._stepper.fail_all(exc)
        for handle in waiting:
            self._finish_waiting(handle, "error")
            handle.emit(exc)
        waiting.clear()

    def _finish_waiting(self, handle: RequestHandle, reason: str) -> None:
        with self._lock:
            self._waiting_count -= 1
        n_prompt = len(handle.request.prompt_ids)
        if reason != "error":
            handle.emit(FinishEvent(reason, "", n_prompt, 0))  # type: ignore[arg-type]
            self._metrics.on_finish(
                handle.request.adapter_id, reason, n_prompt, 0, time.monotonic() - handle.submitted
            )

    def _expire_waiting(self, waiting: deque[RequestHandle]) -> None:
        now = time.monotonic()
        for handle in list(waiting):
            if handle.cancelled or handle.expired(now):
                waiting.remove(handle)
                self._finish_waiting(handle, "cancelled" if handle.cancelled else "deadline")

    def _admit(self, waiting: deque[RequestHandle]) -> list[RowState]:
        """FIFO admission of requests whose adapter is on a device slot; a request whose
        adapter is still loading is skipped, not blocking the ones behind it. Slots are
        first come, first served: once a request waits for a slot while every slot is
        pinned by running requests, no later request pins one (those for resident
        adapters wait too; base rows still join), so the pins drain and the oldest gets
        the first slot freed. Otherwise a stream of requests for resident adapters would
        keep every slot pinned and the waiting one would starve until its deadline."""
        room = self._max_batch_size - len(self._stepper.rows)
        admitted: list[RowState] = []
        slot_blocked = False
        for handle in list(waiting):
            if len(admitted) >= room:
                break
            if slot_blocked and handle.request.adapter_id is not None:
                continue
            try:
                row = self._admit_one(handle)
            except Exception as exc:
                # Whatever admitting this one request raised (an adapter that fails to
                # load, a parameter torch refuses) is its own failure, not the worker's.
                waiting.remove(handle)
                self._finish_waiting(handle, "error")
                if not isinstance(exc, EngineError):
                    log.exception("admitting %s failed", handle.request.request_id)
                    exc = RequestFailedError(
                        f"request {handle.request.request_id} failed: {type(exc).__name__}: {exc}"
                    )
                handle.emit(exc)
                continue
            if row is None:  # its adapter is loading, or no slot can be freed
                slot_blocked = slot_blocked or self.cache.slots_exhausted()
                continue
            waiting.remove(handle)
            with self._lock:
                self._waiting_count -= 1
            admitted.append(row)
        return admitted

    def _admit_one(self, handle: RequestHandle) -> RowState | None:
        """The request's row, its adapter pinned on a slot; None while the adapter loads."""
        adapter_id = handle.request.adapter_id
        slot = None
        if adapter_id is not None:
            slot = self.cache.lookup(adapter_id)
            if slot is None:
                return None
            self.cache.pin(slot)
        try:
            return self._row(handle, slot)
        except BaseException:
            if slot is not None:
                self.cache.unpin(slot)
            raise

    def _row(self, handle: RequestHandle, slot: int | None) -> RowState:
        handle.request.admitted_at = time.monotonic()  # the end of its queueing
        params = handle.request.params
        decode = self._decode_text
        return RowState(
            handle=handle,
            slot=slot,
            text=TextStream(
                decode=decode,
                stops=tuple(s for s in params.stop if s),
                stops_from=params.min_tokens,
            ),
            generator=make_generator(params.seed, self._device) if params.do_sample else None,
            seen=list(handle.request.prompt_ids),
            adapter_sha256=None if slot is None else self.cache.slot_sha256(slot),
        )

    def _decode_text(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _publish_stats(self, waiting: deque[RequestHandle]) -> None:
        rows = self._stepper.rows
        stats = EngineStats(
            running=len(rows),
            waiting=len(waiting),
            running_adapters=tuple(sorted({r.adapter_id for r in rows if r.adapter_id})),
            waiting_adapters=tuple(
                sorted({h.request.adapter_id for h in waiting if h.request.adapter_id})
            ),
            max_slots=self.max_slots,
            mode=self._stepper.mode if rows else "idle",
        )
        with self._lock:
            self._stats = stats
            waiting_total = self._waiting_count
        self._metrics.on_queue(waiting_total, len(rows))


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """EOS ids from the generation config (an int or a list) and the tokenizer."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if eos is None:
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos is not None:
        ids.update(int(e) for e in eos)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
