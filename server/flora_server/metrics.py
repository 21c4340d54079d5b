"""Prometheus metrics, one `CollectorRegistry` per app (never the global default).

Latency histograms are labelled by adapter with bounded cardinality: an adapter gets its own
label value while it is among the top N by traffic, everything else is `other`, and requests
without an adapter are `base`. Engine gauges (queue length, running batch, KV-cache usage,
adapter residency, the `vllm:lora_requests_info` gauge the Gateway API Inference Extension
reads) are computed from `engine.stats()` at scrape time, so they are never stale. The routing
signals the endpoint picker reads are listed in docs/deploy.md (deploy/k8s/components/
inference-pool names them); process and platform metrics come from prometheus_client.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as TallyCounter
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from flora_server.engine.protocol import EngineStats

BASE_LABEL = "base"
OTHER_LABEL = "other"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class AdapterLabeler:
    """Maps adapter ids to metric label values: the top `top_n` by traffic keep their id.

    An adapter enters the labelled set when the set has room or when its count passes the
    smallest count in the set. Each id that ever had its own label stays a live series, so
    the number of series is bounded by `2 * top_n + 2` (ids admitted stop after that).
    """

    def __init__(self, top_n: int) -> None:
        self.top_n = top_n
        self._counts: TallyCounter[str] = TallyCounter()
        self._labelled: set[str] = set()
        self._ever: set[str] = set()
        self._lock = threading.Lock()

    def label(self, adapter_id: str | None) -> str:
        if adapter_id is None:
            return BASE_LABEL
        with self._lock:
            self._counts[adapter_id] += 1
            if adapter_id in self._labelled:
                return adapter_id
            if self.top_n <= 0:
                return OTHER_LABEL
            if len(self._labelled) < self.top_n:
                return self._admit(adapter_id)
            weakest = min(self._labelled, key=lambda a: (self._counts[a], a))
            if self._counts[adapter_id] > self._counts[weakest] and (
                adapter_id in self._ever or len(self._ever) < 2 * self.top_n
            ):
                self._labelled.discard(weakest)
                return self._admit(adapter_id)
            return OTHER_LABEL

    def _admit(self, adapter_id: str) -> str:
        if adapter_id not in self._ever and len(self._ever) >= 2 * self.top_n:
            return OTHER_LABEL
        self._labelled.add(adapter_id)
        self._ever.add(adapter_id)
        return adapter_id


class _EngineStatsCollector(Collector):
    """Scrape-time gauges from `engine.stats()`."""

    def __init__(
        self, stats: Callable[[], EngineStats | None], model_name: Callable[[], str]
    ) -> None:
        self._stats = stats
        self._model_name = model_name

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._stats()
        yield from self._placement(stats, self._model_name())
        queue = GaugeMetricFamily("flora_queue_length", "Requests waiting for a batch row")
        running = GaugeMetricFamily("flora_running_batch_size", "Rows in the running batch")
        slots = GaugeMetricFamily("flora_adapter_slots", "Adapter slots on the device")
        loaded = GaugeMetricFamily("flora_loaded_adapters", "Adapters resident on the device")
        labels = ["running_lora_adapters", "waiting_lora_adapters", "max_lora"]
        info = [
            GaugeMetricFamily(
                name, "Adapters running and waiting (value: a timestamp)", labels=labels
            )
            for name in ("flora_lora_requests_info", "vllm:lora_requests_info")
        ]
        if stats is not None:
            queue.add_metric([], stats.waiting)
            running.add_metric([], stats.running)
            slots.add_metric([], stats.max_slots)
            loaded.add_metric([], len(stats.loaded_adapters))
            values = [
                ",".join(sorted(set(stats.running_adapters))),
                ",".join(sorted(set(stats.waiting_adapters))),
                str(stats.max_slots),
            ]
            for family in info:
                # vLLM reports the time of the update as the value; routers read the labels.
                family.add_metric(values, time.time())
        yield from (queue, running, slots, loaded, *info)

    @staticmethod
    def _placement(stats: EngineStats | None, model: str) -> Iterator[GaugeMetricFamily]:
        """Routing signals labelled `model_name` as vLLM labels them: KV-cache usage, the
        vLLM-named queue/running/KV gauges (so an endpoint picker left on its built-in `vllm`
        metric names still reads this server), and per-adapter residency by tier, so a
        loaded-but-idle adapter still attracts its traffic (like vLLM's proposed
        `vllm:lora_adapter_loaded`). Residency series are bounded by the slots plus the
        adapters the host cache holds."""
        kv = GaugeMetricFamily(
            "flora_kv_cache_usage_perc",
            "Fraction (0..1) of the KV-cache pool in use (0: no fixed pool)",
            labels=["model_name"],
        )
        aliases = [
            GaugeMetricFamily(name, doc, labels=["model_name"])
            for name, doc in (
                ("vllm:num_requests_waiting", "Requests waiting (vLLM name)"),
                ("vllm:num_requests_running", "Requests running (vLLM name)"),
                ("vllm:kv_cache_usage_perc", "KV-cache usage 0..1 (vLLM name)"),
            )
        ]
        resident = GaugeMetricFamily(
            "flora_lora_adapter_loaded",
            "1 for each adapter resident in a tier (device slot or host cache)",
            labels=["model_name", "adapter", "tier"],
        )
        if stats is not None:
            kv.add_metric([model], stats.kv_cache_usage)
            for family, value in zip(
                aliases, (stats.waiting, stats.running, stats.kv_cache_usage), strict=True
            ):
                family.add_metric([model], value)
            for tier, ids in (("device", stats.loaded_adapters), ("host", stats.host_adapters)):
                for adapter_id in sorted(set(ids)):
                    resident.add_metric([model, adapter_id, tier], 1)
        yield from (kv, *aliases, resident)


class _PrefixCacheCollector(Collector):
    """Scrape-time prefix-cache counters from `engine.stats()` (engine v2; v1 reports 0):
    prompt tokens looked up, and those found cached."""

    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self._stats()
        queries = CounterMetricFamily(
            "flora_prefix_cache_queries", "Prompt tokens looked up in the prefix cache"
        )
        hits = CounterMetricFamily("flora_prefix_cache_hits", "Prompt tokens found cached")
        if stats is not None:
            queries.add_metric([], stats.prefix_cache_queries)
            hits.add_metric([], stats.prefix_cache_hits)
        yield from (queries, hits)


class ServerMetrics:
    """All metrics of one app, plus the engine's metric hooks."""

    def __init__(self, top_adapters: int = 20) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.labeler = AdapterLabeler(top_adapters)
        r = self.registry
        self.http_requests = Counter(
            "flora_http_requests",
            "HTTP requests by route and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.client_disconnects = Counter(
            "flora_client_disconnects",
            "Requests whose client went away before the request body was read (not errors)",
            ["route"],
            registry=r,
        )
        self.http_latency = Histogram(
            "flora_http_request_seconds",
            "HTTP request duration by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "flora_time_to_first_token_seconds",
            "Time from request to first token",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "flora_inter_token_latency_seconds",
            "Time between consecutive tokens",
            ["adapter"],
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "flora_request_latency_seconds",
            "Time from request to last token",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter(
            "flora_generated_tokens", "Tokens generated", ["adapter"], registry=r
        )
        self.prompt_tokens = Counter(
            "flora_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r
        )
        self.finished = Counter(
            "flora_requests_finished",
            "Generation requests by finish reason",
            ["reason"],
            registry=r,
        )
        self.cache_hits = Counter(
            "flora_adapter_cache_hits", "Adapter cache hits", ["tier"], registry=r
        )
        self.cache_misses = Counter(
            "flora_adapter_cache_misses", "Adapter loads from the store", registry=r
        )
        self.cache_evictions = Counter(
            "flora_adapter_cache_evictions", "Adapters evicted", ["tier"], registry=r
        )
        self.adapter_load = Histogram(
            "flora_adapter_load_seconds",
            "Time to load an adapter from the store",
            ["result"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.steps = Counter(
            "flora_engine_steps",
            "Engine decode/prefill steps by adapter mode",
            ["mode"],
            registry=r,
        )
        self.step_rows = Histogram(
            "flora_engine_step_batch_size",
            "Rows per engine step",
            ["mode"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.step_seconds = Histogram(
            "flora_engine_step_seconds",
            "Seconds per engine step",
            ["mode"],
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.engine_tokens = Counter(
            "flora_engine_generated_tokens", "Tokens generated by the engine", registry=r
        )
        self.engine_finished = Counter(
            "flora_engine_requests_finished",
            "Requests the engine ended, by reason",
            ["reason"],
            registry=r,
        )
        self.merge_switches = Counter(
            "flora_engine_merge_switches", "Times the merged adapter changed", registry=r
        )
        self._stats_source: Callable[[], EngineStats | None] = lambda: None
        self._model_name = ""
        r.register(_EngineStatsCollector(lambda: self._stats_source(), lambda: self._model_name))
        r.register(_PrefixCacheCollector(lambda: self._stats_source()))
        # process_* (CPU, RSS, open fds), python_info and python_gc_* on this app's registry.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    def bind_engine_stats(
        self, stats: Callable[[], EngineStats | None], model_name: str = ""
    ) -> None:
        """Read queue/batch/adapter gauges from this callable at scrape time; `model_name`
        labels the routing gauges."""
        self._stats_source = stats
        self._model_name = model_name

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- the engine's metric hooks (flora_server.engine.hooks.EngineMetrics) ----------
    # Called on the worker and loader threads; prometheus-client metrics are thread-safe.
    # Per-request latencies are measured by the API layer (RequestTimer), as the client sees
    # them, so on_first_token/on_finish/on_tokens/on_queue only feed engine-side counters.
    def on_step(self, mode: str, batch_size: int, seconds: float) -> None:
        self.steps.labels(mode).inc()
        self.step_rows.labels(mode).observe(batch_size)
        self.step_seconds.labels(mode).observe(seconds)

    def on_tokens(self, count: int) -> None:
        self.engine_tokens.inc(count)

    def on_queue(self, waiting: int, running: int) -> None:
        pass  # read from engine.stats() at scrape time instead

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
        self.engine_finished.labels(reason).inc()

    def on_mode_switch(self, old: str | None, new: str | None) -> None:
        self.merge_switches.inc()

    def on_cache_hit(self, tier: str) -> None:
        self.cache_hits.labels(tier).inc()

    def on_cache_miss(self) -> None:
        self.cache_misses.inc()

    def on_cache_eviction(self, tier: str) -> None:
        self.cache_evictions.labels(tier).inc()

    def on_adapter_load(self, adapter_id: str, seconds: float, ok: bool) -> None:
        self.adapter_load.labels("ok" if ok else "error").observe(seconds)


class RequestTimer:
    """Per-request latency bookkeeping for one generation (time.monotonic based)."""

    def __init__(self, metrics: ServerMetrics, adapter_id: str | None) -> None:
        self.metrics = metrics
        self.label = metrics.labeler.label(adapter_id)
        self.start = time.monotonic()
        self._last: float | None = None
        self.tokens = 0

    def token(self) -> None:
        now = time.monotonic()
        if self._last is None:
            self.metrics.ttft.labels(self.label).observe(now - self.start)
        else:
            self.metrics.itl.labels(self.label).observe(now - self._last)
        self._last = now
        self.tokens += 1

    def finish(self, reason: str, prompt_tokens: int, generated_tokens: int) -> None:
        self.metrics.e2e.labels(self.label).observe(time.monotonic() - self.start)
        self.metrics.generated_tokens.labels(self.label).inc(generated_tokens)
        self.metrics.prompt_tokens.labels(self.label).inc(prompt_tokens)
        self.metrics.finished.labels(reason).inc()
