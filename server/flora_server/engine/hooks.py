"""Hooks the engine calls so the HTTP layer can export metrics without the engine knowing
Prometheus. All hooks are called on the worker (or adapter-loader) threads and must be
cheap and thread-safe; `NullEngineMetrics` is the default."""

from __future__ import annotations

from typing import Protocol


class EngineMetrics(Protocol):
    def on_step(self, mode: str, batch_size: int, seconds: float) -> None:
        """One forward step (prefill or decode) over `batch_size` rows in `mode`."""

    def on_tokens(self, count: int) -> None:
        """`count` tokens were generated in the last step."""

    def on_queue(self, waiting: int, running: int) -> None:
        """Queue and batch sizes after a scheduling decision."""

    def on_first_token(self, adapter_id: str | None, seconds: float) -> None:
        """Time from submission to the first generated token of one request."""

    def on_finish(
        self,
        adapter_id: str | None,
        reason: str,
        prompt_tokens: int,
        generated_tokens: int,
        seconds: float,
    ) -> None:
        """A request ended (any reason, including cancelled and deadline)."""

    def on_mode_switch(self, old: str | None, new: str | None) -> None:
        """The merged adapter changed (None = base weights)."""

    def on_cache_hit(self, tier: str) -> None:
        """An adapter was found in `tier` ("device" or "host")."""

    def on_cache_miss(self) -> None:
        """An adapter had to be read from the store."""

    def on_cache_eviction(self, tier: str) -> None:
        """An adapter left `tier` ("device" or "host")."""

    def on_adapter_load(self, adapter_id: str, seconds: float, ok: bool) -> None:
        """A background load from the store finished."""


class NullEngineMetrics:
    """Does nothing; the default when no metrics are configured."""

    def on_step(self, mode: str, batch_size: int, seconds: float) -> None:
        pass

    def on_tokens(self, count: int) -> None:
        pass

    def on_queue(self, waiting: int, running: int) -> None:
        pass

    def on_first_token(self, adapter_id: str | None, seconds: float) -> None:
        pass

    def on_finish(
        self,
        adapter_id: str | None,
        reason: str,
        prompt_tokens: int,
        generated_tokens: int,
        seconds: float,
    ) -> None:
        pass

    def on_mode_switch(self, old: str | None, new: str | None) -> None:
        pass

    def on_cache_hit(self, tier: str) -> None:
        pass

    def on_cache_miss(self) -> None:
        pass

    def on_cache_eviction(self, tier: str) -> None:
        pass

    def on_adapter_load(self, adapter_id: str, seconds: float, ok: bool) -> None:
        pass
