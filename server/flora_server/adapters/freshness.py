"""Bounded staleness across replicas: a thread that rechecks cached adapters against the store.

Replicas share one store but each caches validated adapters (host LRU, device slots). A
delete or overwrite through replica A reaches A's caches at once (the API invalidates them);
replica B learns of it here. Every `interval` seconds the checker asks the registry which
adapters it loaded whose store entry is gone or has another digest, and invalidates those in
the engine. Requests admitted after that reload (new weights) or get 404 (deleted).

The bound, for a change committed at time t: B admits no new request on the old weights
after t + interval + one recheck pass (one digest read per loaded adapter) + one engine
step. Requests already running when the invalidation lands finish on the weights they
started with (the engine's rule for local deletes too).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

logger = logging.getLogger(__name__)


class StaleSource(Protocol):
    def stale_ids(self) -> list[str]: ...


class StoreRechecker:
    """Calls `on_stale(adapter_id)` for each id `source.stale_ids()` reports, every
    `interval` seconds, on a daemon thread, until `stop()`."""

    def __init__(
        self, source: StaleSource, interval: float, on_stale: Callable[[str], None]
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self._source = source
        self._interval = interval
        self._on_stale = on_stale
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.passes = 0  # completed rechecks (tests wait on it)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="store-recheck", daemon=True)
            self._thread.start()

    def recheck_once(self) -> list[str]:
        """One pass: invalidate and return the stale ids."""
        stale = self._source.stale_ids()
        for adapter_id in stale:
            logger.info("adapter %s changed or was deleted in the store: invalidated", adapter_id)
            self._on_stale(adapter_id)
        self.passes += 1
        return stale

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.recheck_once()
            except Exception:  # a broken store must not end the rechecks for good
                logger.exception("store recheck failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
