"""`PagedLLMEngine` (engine v2): `LLMEngine`'s worker, queueing, admission of adapters and
request plumbing, with the paged stepper (`paged.stepper`) in place of the left-padded
batch. Selected by the setting `engine = "v2"` (docs/engine.md).

The KV pool is sized once from `kv_cache_bytes` (keys + values of every layer, in the
model's dtype). A pool smaller than the model's context is the engine's context length
(`context_length`, what /info and the OpenAI model card report): the routes refuse a
prompt plus `max_new_tokens` beyond it as they refuse one beyond the model's context, and
every admitted request fits the pool alone, so preemption can always make progress.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from typing import Any

from flora_server.engine.llm_engine import LLMEngine
from flora_server.engine.paged.capture import GraphCapture, graph_capture_for
from flora_server.engine.paged.fused import fused_kernels
from flora_server.engine.paged.graphs import MAX_SAMPLES, GraphedPagedRunner
from flora_server.engine.paged.kv_cache import BlockPool
from flora_server.engine.paged.runner import KVTensors, PagedRunner
from flora_server.engine.paged.scheduler import PagedScheduler
from flora_server.engine.paged.stepper import PagedStepper
from flora_server.engine.protocol import AdapterSource, EngineStats
from flora_server.engine.requests import RequestHandle
from flora_server.engine.runtime import AdapterRuntime, build_serving_runtime
from flora_server.engine.stepper import Stepper

log = logging.getLogger(__name__)


class PagedLLMEngine(LLMEngine):
    """Engine v2; same constructor as `LLMEngine` plus the pool and step settings."""

    def __init__(
        self,
        loaded: Any,
        source: AdapterSource,
        *,
        kv_cache_bytes: int = 1 << 30,
        kv_block_size: int = 16,
        max_num_batched_tokens: int = 512,
        prefix_caching: bool = True,
        max_slots: int = 8,
        factor_dtype: str = "auto",
        cuda_graphs: str = "auto",
        graph_capture: GraphCapture | None = None,
        runtime: AdapterRuntime | None = None,
        **kwargs: Any,
    ) -> None:
        model = loaded.model
        dtype = next(model.parameters()).dtype
        per_token = KVTensors.bytes_per_token(model.config, dtype)
        num_blocks = kv_cache_bytes // (per_token * kv_block_size)
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_bytes={kv_cache_bytes} holds no block of {kv_block_size} tokens "
                f"({per_token} bytes per token)"
            )
        self._pool = BlockPool(num_blocks, kv_block_size, prefix_caching)
        self._kv_dtype = dtype
        self._token_budget = max_num_batched_tokens
        # `graph_capture` overrides the setting (tests and the CPU dry run of the GPU bench).
        self._graph_capture = graph_capture or graph_capture_for(
            cuda_graphs, next(model.parameters()).device
        )
        self._sched_waiting = 0
        super().__init__(
            loaded,
            source,
            max_slots=max_slots,
            factor_dtype=factor_dtype,
            runtime=runtime or build_serving_runtime(model, max_slots, factor_dtype),
            **kwargs,
        )
        capacity = self._pool.capacity
        self._stats = dataclasses.replace(self._stats, kv_capacity_tokens=capacity)
        if capacity < self.context_length:
            log.warning(
                "the KV cache holds %d tokens, fewer than the model's context of %d: requests "
                "are limited to %d tokens (raise FLORA_KV_CACHE_BYTES for more)",
                capacity,
                self.context_length,
                capacity,
            )
            self.context_length = capacity

    @property
    def pool(self) -> BlockPool:
        return self._pool

    @property
    def kv_bytes_per_token(self) -> int:
        return KVTensors.bytes_per_token(self._model.config, self._kv_dtype)

    def _make_stepper(self, eos_ids: set[int], merge_after_steps: int | None) -> Stepper:
        config = self._model.config
        heads = config.num_attention_heads
        capture = self._graph_capture
        if not hasattr(self._runtime, "set_graph_routing"):
            capture = None  # a runtime other than flora.serving's cannot route a graph
        weight = next(self._model.parameters())
        kv = KVTensors(
            config.num_hidden_layers,
            self._pool.num_blocks + (capture is not None),  # + the graphs' scratch block
            self._pool.block_size,
            getattr(config, "num_key_value_heads", None) or heads,
            getattr(config, "head_dim", None) or config.hidden_size // heads,
            self._kv_dtype,
            weight.device,
        )
        return PagedStepper(
            self._model,
            self._runtime,
            self.cache,
            eos_ids,
            self._metrics,
            merge_after_steps,
            runner=PagedRunner(self._model, kv)
            if capture is None
            else GraphedPagedRunner(
                self._model,
                kv,
                self._runtime,  # type: ignore[arg-type]
                capture,
                scratch_block=self._pool.num_blocks,
                budget=self._token_budget,
                max_samples=max(self._max_batch_size, MAX_SAMPLES),
                fused=fused_kernels(weight.device, weight.dtype),
            ),
            scheduler=PagedScheduler(self._pool, self._token_budget, self._max_batch_size),
        )

    def stats(self) -> EngineStats:
        stats = super().stats()
        return dataclasses.replace(stats, waiting=stats.waiting + self._sched_waiting)

    def _publish_stats(self, waiting: deque[RequestHandle]) -> None:
        scheduler = self._stepper.scheduler  # type: ignore[attr-defined]
        rows = [seq.row for seq in scheduler.running]
        pending = [seq.row for seq in scheduler.waiting]
        stats = EngineStats(
            running=len(rows),
            waiting=len(waiting) + len(pending),
            running_adapters=tuple(sorted({r.adapter_id for r in rows if r.adapter_id})),
            waiting_adapters=tuple(
                sorted(
                    {h.request.adapter_id for h in waiting if h.request.adapter_id}
                    | {r.adapter_id for r in pending if r.adapter_id}
                )
            ),
            max_slots=self.max_slots,
            mode=self._stepper.mode if rows else "idle",
            kv_cache_usage=self._pool.usage,
            prefix_cache_queries=self._pool.queries,
            prefix_cache_hits=self._pool.hits,
            kv_capacity_tokens=self._pool.capacity,
        )
        with self._lock:
            self._stats = stats
            self._sched_waiting = len(pending)
            waiting_total = self._waiting_count + len(pending)
        self._metrics.on_queue(waiting_total, len(rows))
