"""The lifecycle every engine shares: one daemon worker thread and its state flags.

`ready` means warmed up and accepting; `healthy` turns False once the thread died without
being asked to stop (the server then answers 503 on /health and exits so Kubernetes
restarts it). Subclasses implement `_run` and set `_ready` / `_crashed` from it.
"""

from __future__ import annotations

import threading


class WorkerThreadMixin:
    """State of an engine's single worker thread (used by `LLMEngine` and `BatchEngine`)."""

    _thread_name: str

    def _init_worker(self, thread_name: str) -> None:
        self._thread_name = thread_name
        self._thread: threading.Thread | None = None
        self._ready = False  # set by the worker after warm-up
        self._accepting = False  # False before start() and once shutdown() began
        self._crashed = False  # the worker raised
        self._stopping = False  # shutdown() asked the worker to finish

    @property
    def ready(self) -> bool:
        return self._ready and self._accepting and self.healthy

    @property
    def healthy(self) -> bool:
        if self._crashed:
            return False
        return self._thread is None or self._thread.is_alive() or self._stopping

    def start(self) -> None:
        if self._thread is not None:
            return
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        raise NotImplementedError
