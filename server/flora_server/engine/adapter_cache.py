"""Adapter cache: device slots over a host LRU over the store.

    store (AdapterSource.load, slow: disk/S3 read + validation)
      -> host LRU: validated `Adapter` objects in RAM, bounded by a byte budget
        -> device slots: `max_slots` slots of the `flora.serving` runtime

Threads: the engine worker is the only caller of `lookup`, `pin`, `unpin` and
`apply_invalidations` and the only one that touches the runtime (the device). Store reads
run on a small loader pool and only hand the result over; `invalidate` and the read-only
views may be called from any thread. A miss therefore never blocks the running batch: the
worker keeps stepping and retries `lookup` for the requests that wait on the adapter.

Freshness: `invalidate` (after a delete or an overwrite answers) bumps the id's generation.
Every cached copy remembers the generation it was loaded under, and a copy of an older
generation is never handed to a request admitted afterwards: device slots of an older
generation are not found by `lookup`, a load that finishes after an invalidation is
dropped, and an adapter taken from the host cache is checked again, under the lock, after it
is placed on a slot (the invalidation can land while the worker places it). Each copy also
carries the sha256 of the stored bytes it came from (`slot_sha256`), reported with results.

Eviction: a device slot is reused least-recently-used first among slots that no running
request has pinned; the host LRU drops least-recently-used adapters beyond its byte budget
(an adapter on a device slot may leave the host cache; it is re-read from the store if it is
needed again after its slot is reused).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flora_server.engine.hooks import EngineMetrics, NullEngineMetrics
from flora_server.engine.protocol import (
    AdapterLoadError,
    AdapterSource,
    EngineError,
    LoadedAdapter,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from flora_server.engine.runtime import AdapterRuntime


def adapter_nbytes(adapter: Any) -> int:
    """Bytes held by an adapter's tensors (`Adapter.nbytes()` when it has one)."""
    nbytes = getattr(adapter, "nbytes", None)
    if callable(nbytes):
        return int(nbytes())
    if isinstance(nbytes, int):
        return nbytes
    tensors = getattr(adapter, "tensors", {}) or {}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class CacheCounters:
    device_hits: int = 0
    host_hits: int = 0
    misses: int = 0
    device_evictions: int = 0
    host_evictions: int = 0
    loads: int = 0
    load_failures: int = 0
    load_seconds: float = 0.0


@dataclass
class _Slot:
    adapter_id: str | None = None
    pins: int = 0
    last_used: int = 0
    stale: bool = False  # invalidated while pinned: unload when the last pin goes
    generation: int = 0  # the id's generation when its copy was loaded
    sha256: str | None = None  # of the stored bytes the copy came from


@dataclass(frozen=True)
class _Copy:
    """A loaded adapter off the device: the generation it was loaded under and its digest."""

    adapter: Any
    generation: int
    sha256: str | None


class AdapterCache:
    """See the module docstring. `on_loaded` is called (from a loader thread) whenever a
    background load finishes, so the worker can wake up and retry waiting requests."""

    def __init__(
        self,
        source: AdapterSource,
        runtime: AdapterRuntime,
        *,
        max_slots: int,
        host_bytes: int,
        loader_threads: int = 2,
        failure_ttl: float = 1.0,
        metrics: EngineMetrics | None = None,
        on_loaded: Callable[[], None] | None = None,
    ) -> None:
        if max_slots < 1:
            raise ValueError("max_slots must be >= 1")
        self._source = source
        self._runtime = runtime
        self._metrics = metrics or NullEngineMetrics()
        self._on_loaded = on_loaded
        self._host_bytes = host_bytes
        self._failure_ttl = failure_ttl
        self._slots = [_Slot() for _ in range(max_slots)]
        self._clock = 0
        self._lock = threading.Lock()
        self._host: OrderedDict[str, tuple[_Copy, int]] = OrderedDict()  # id -> (copy, bytes)
        self._staged: dict[str, _Copy] = {}  # loaded, not yet placed on a slot
        self._inflight: set[str] = set()
        self._failed: dict[str, tuple[float, EngineError]] = {}
        self._generation: dict[str, int] = {}
        self._pending_invalidations: set[str] = set()
        self._pool = ThreadPoolExecutor(
            max_workers=loader_threads, thread_name_prefix="adapter-load"
        )
        self.counters = CacheCounters()

    @property
    def max_slots(self) -> int:
        return len(self._slots)

    # -- worker thread ---------------------------------------------------------------

    def lookup(self, adapter_id: str) -> int | None:
        """The device slot that holds `adapter_id`, placing it there from the host cache if
        needed; None while it is being read from the store or every slot is pinned. Raises
        the load error (`AdapterNotFoundError`, `AdapterLoadError`) when the last load
        failed less than `failure_ttl` seconds ago."""
        slot = self.current_slot(adapter_id)
        if slot is not None:
            self.counters.device_hits += 1
            self._metrics.on_cache_hit("device")
            self._touch(slot)
            return slot
        with self._lock:
            failure = self._failed.get(adapter_id)
            if failure is not None and time.monotonic() - failure[0] < self._failure_ttl:
                raise failure[1]
            copy = self._staged.get(adapter_id)
            from_host = copy is None and adapter_id in self._host
            if from_host:
                copy = self._host[adapter_id][0]
                self._host.move_to_end(adapter_id)
            if copy is None:
                if adapter_id not in self._inflight:
                    self._start_load(adapter_id)
                return None
        slot = self._free_slot()
        if slot is None:
            return None
        if from_host:
            self.counters.host_hits += 1
            self._metrics.on_cache_hit("host")
        try:
            self._place(slot, adapter_id, copy)
        except Exception as exc:  # shapes the runtime refuses (rank above its maximum, ...)
            error = AdapterLoadError(f"adapter {adapter_id!r} cannot be served: {exc}")
            with self._lock:
                self._staged.pop(adapter_id, None)
                self._host.pop(adapter_id, None)
                self._failed[adapter_id] = (time.monotonic(), error)
            raise error from exc
        with self._lock:
            current = self._generation.get(adapter_id, 0) == copy.generation
            if current:
                self._staged.pop(adapter_id, None)
                self._host_insert(adapter_id, copy)
        if not current:
            # Invalidated while it was being placed: the copy is of replaced (or deleted)
            # bytes. Nobody pinned the slot yet; free it and let the next lookup reload.
            self._unload(slot)
            return None
        return slot

    def current_slot(self, adapter_id: str) -> int | None:
        """The slot holding the current generation of `adapter_id`, or None; loads and
        touches nothing. A copy of an older generation is skipped even before
        `apply_invalidations` marks it stale."""
        generation = self._generation.get(adapter_id, 0)
        for index, entry in enumerate(self._slots):
            current = entry.generation == generation
            if entry.adapter_id == adapter_id and not entry.stale and current:
                return index
        return None

    def slot_adapter(self, slot: int) -> str | None:
        """The id of the adapter on `slot` (None: empty)."""
        return self._slots[slot].adapter_id

    def slot_sha256(self, slot: int) -> str | None:
        """sha256 of the stored bytes on `slot` (None when the source gave no digest)."""
        return self._slots[slot].sha256

    def pin(self, slot: int) -> None:
        """A running request uses `slot`: it must not be evicted."""
        self._slots[slot].pins += 1
        self._touch(slot)

    def unpin(self, slot: int) -> None:
        entry = self._slots[slot]
        entry.pins -= 1
        if entry.pins == 0 and entry.stale:
            self._unload(slot)

    def apply_invalidations(self) -> None:
        """Drop device copies of adapters invalidated since the last call (unpinned slots
        now; pinned ones once their running requests finish)."""
        with self._lock:
            pending, self._pending_invalidations = self._pending_invalidations, set()
            generations = {a: self._generation.get(a, 0) for a in pending}
        for adapter_id in pending:
            for index, entry in enumerate(self._slots):
                old = entry.generation < generations[adapter_id]
                if entry.adapter_id == adapter_id and not entry.stale and old:
                    entry.stale = True
                    if entry.pins == 0:
                        self._unload(index)

    # -- any thread ------------------------------------------------------------------

    def invalidate(self, adapter_id: str) -> None:
        """Forget every cached copy of `adapter_id` (after a delete or an overwrite).
        Running requests keep their slot until they finish; later ones reload."""
        with self._lock:
            self._generation[adapter_id] = self._generation.get(adapter_id, 0) + 1
            self._host.pop(adapter_id, None)
            self._staged.pop(adapter_id, None)
            self._failed.pop(adapter_id, None)
            self._inflight.discard(adapter_id)
            self._pending_invalidations.add(adapter_id)

    def device_adapters(self) -> tuple[str, ...]:
        """Adapters currently on a device slot (stale copies excluded)."""
        return tuple(
            s.adapter_id for s in list(self._slots) if s.adapter_id is not None and not s.stale
        )

    def host_adapters(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._host)

    def host_bytes_used(self) -> int:
        with self._lock:
            return sum(size for _, size in self._host.values())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def slots_exhausted(self) -> bool:
        """Every slot holds an adapter that running requests have pinned: a request for
        another adapter waits until one of them finishes."""
        return all(s.adapter_id is not None and s.pins > 0 for s in self._slots)

    # -- internals -------------------------------------------------------------------

    def _touch(self, slot: int) -> None:
        self._clock += 1
        self._slots[slot].last_used = self._clock

    def _free_slot(self) -> int | None:
        """An empty slot, else the least recently used unpinned one (evicted), else None."""
        for index, entry in enumerate(self._slots):
            if entry.adapter_id is None:
                return index
        candidates = [i for i, s in enumerate(self._slots) if s.pins == 0]
        if not candidates:
            return None
        victim = min(candidates, key=lambda i: self._slots[i].last_used)
        self._unload(victim)
        self.counters.device_evictions += 1
        self._metrics.on_cache_eviction("device")
        return victim

    def _place(self, slot: int, adapter_id: str, copy: _Copy) -> None:
        self._runtime.load(slot, copy.adapter)
        self._slots[slot] = _Slot(adapter_id, generation=copy.generation, sha256=copy.sha256)
        self._touch(slot)

    def _unload(self, slot: int) -> None:
        if self._runtime.merged_slot == slot:
            self._runtime.unmerge()
        self._runtime.unload(slot)
        self._slots[slot] = _Slot()

    def _host_insert(self, adapter_id: str, copy: _Copy) -> None:
        """Caller holds the lock. Insert as most recent, then evict beyond the budget
        (the newest entry stays even when it alone exceeds the budget)."""
        self._host[adapter_id] = (copy, adapter_nbytes(copy.adapter))
        self._host.move_to_end(adapter_id)
        total = sum(size for _, size in self._host.values())
        while total > self._host_bytes and len(self._host) > 1:
            _, (_, size) = self._host.popitem(last=False)
            total -= size
            self.counters.host_evictions += 1
            self._metrics.on_cache_eviction("host")

    def _start_load(self, adapter_id: str) -> None:
        """Caller holds the lock."""
        self._inflight.add(adapter_id)
        self.counters.misses += 1
        self._metrics.on_cache_miss()
        generation = self._generation.get(adapter_id, 0)
        self._pool.submit(self._load, adapter_id, generation)

    def _load(self, adapter_id: str, generation: int) -> None:
        started = time.monotonic()
        adapter, sha256, error = None, None, None
        try:
            loaded = self._source.load(adapter_id)
            if isinstance(loaded, LoadedAdapter):
                adapter, sha256 = loaded.adapter, loaded.sha256
            else:
                adapter = loaded
            # What the runtime would refuse is refused here, on the loader thread, off the
            # worker's hot path (upload validation ran the same check).
            self._runtime.check(adapter)
        except EngineError as exc:
            error = exc
        except Exception as exc:  # a broken store must fail the request, not the worker
            error = AdapterLoadError(f"adapter {adapter_id!r} could not be loaded: {exc}")
        seconds = time.monotonic() - started
        with self._lock:
            current = self._generation.get(adapter_id, 0) == generation
            if current:
                self._inflight.discard(adapter_id)
                self.counters.loads += 1
                self.counters.load_seconds += seconds
                if error is None:
                    self._staged[adapter_id] = _Copy(adapter, generation, sha256)
                    self._failed.pop(adapter_id, None)
                else:
                    self.counters.load_failures += 1
                    self._failed[adapter_id] = (time.monotonic(), error)
        self._metrics.on_adapter_load(adapter_id, seconds, error is None)
        if self._on_loaded is not None:
            self._on_loaded()
