"""CUDA graphs for engine v2's decode steps (setting `cuda_graphs`, docs/engine.md).

A decode step of a small model on a GPU is bound by kernel launches, not by arithmetic:
every layer is a few dozen small kernels and Python dispatches each. `GraphedPagedRunner`
records the whole decode forward (decoder, paged attention, adapter kernels, LM head) once
per shape and replays it with one launch:

- **Buckets.** A pure-decode step of n sequences runs as the smallest batch bucket
  B >= n (`BATCH_BUCKETS`) and the smallest power of two of blocks per sequence that covers
  the longest context. Steps with a prefill chunk, more rows than the largest bucket or a
  longer context run eagerly (`PagedRunner.run`).
- **Static buffers.** A graph reads only tensors that outlive it: `meta` [B, 2 + blocks]
  (each row's token id, position and block table, one host-to-device copy per step) and
  `slots` [B] int32 (each row's adapter slot, -1 for base rows; read in place by the
  adapter kernels through `ServingModel.set_graph_routing`). The pool slots a token writes,
  the gather index and the key mask (and, for sliding-window layers, each row's keys
  within its window) are computed inside the graph from them.
- **Padding rows** (n < B) get token 0 at position 0 with a block table of the scratch block
  only (an extra block of the KV storage that the block pool never hands out) and slot -1:
  they write and read the scratch block, never a real sequence's KV.
- **Two graphs per shape**: base rows only (every row base or on the merged slot: no adapter
  kernel is recorded, so merged and base decode cost the same) and with adapters.
- **What a graph bakes in** is the tensors it was recorded with. The slot banks are
  written in place when adapters load and the weights in place when a slot merges or
  unmerges, so both are read as they are at replay; a module newly wrapped or a bank grown
  to a larger rank re-binds tensors and bumps `ServingModel.layout_version`, which drops
  every graph (recorded again on next use).

The recording mechanism is injected (`GraphCapture`): `CudaGraphCapture` on CUDA (one memory
pool shared by every graph), `RecordedCapture` on the CPU, which re-runs the recorded
Python on replay against the same buffers, so tests and `bench/gpu_engine.py --dry-run`
exercise everything but the CUDA call itself.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from flora_server.engine.paged.fused import FusedKernels, install_rms_norms, install_rope
from flora_server.engine.paged.runner import ChunkInput, KVTensors, PagedRunner, PagedStep

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
"""Decode batch sizes a graph is recorded for (vLLM's default sizes up to 128)."""


class GraphCapture(Protocol):
    """Records a forward that reads and writes only tensors outliving it."""

    def capture(self, forward: Callable[[], None]) -> Callable[[], None]:
        """Record `forward`; returns what replays it (and keeps `forward` alive with it)."""
        ...

    def reset(self) -> None:
        """Every graph recorded so far has been dropped (the runner's graphs were cleared)."""
        ...


@dataclass(frozen=True)
class _CudaReplay:
    """A recorded graph with the forward it recorded. A graph reads and writes raw device
    addresses: the tensors the forward's closure holds (index buffers, masks, the step's
    view of the pool) must live as long as the graph, or the caching allocator hands their
    memory to other tensors and a replay reads whatever is there."""

    graph: torch.cuda.CUDAGraph
    forward: Callable[[], None]

    def __call__(self) -> None:
        self.graph.replay()


class CudaGraphCapture:
    """`torch.cuda.CUDAGraph`, every graph allocating from one shared memory pool (their
    intermediates are dead between replays and only one replays at a time)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.captures = 0  # graphs recorded
        self._pool: Any = None
        self._stream = torch.cuda.Stream(device)

    def capture(self, forward: Callable[[], None]) -> Callable[[], None]:
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            for _ in range(2):  # lazy initialisation (cuBLAS workspaces, Triton compiles)
                forward()
        current.wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: only this (the worker) thread's calls must be capture-safe.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            forward()
        if self._pool is None:
            self._pool = graph.pool()
        self.captures += 1
        return _CudaReplay(graph, forward)

    def reset(self) -> None:
        # The shared pool dies with the last graph that used it; recording into its id
        # afterwards fails inside the allocator, so the next graph starts a new pool.
        self._pool = None


class RecordedCapture:
    """The CPU stand-in: `capture` runs the forward once (as the CUDA warm-up does) and
    replay runs it again, reading the same buffers. `captures` counts recordings."""

    def __init__(self) -> None:
        self.captures = 0

    def capture(self, forward: Callable[[], None]) -> Callable[[], None]:
        self.captures += 1
        forward()
        return forward

    def reset(self) -> None:
        pass


@functools.cache
def cuda_graphs_work(device: torch.device) -> bool:
    """The capability check: a CUDA device on which a recorded kernel replays with the
    buffer's current contents (False on the CPU, or where recording fails)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        x = torch.zeros(4, device=device)

        def add_one() -> None:
            x.add_(1.0)

        replay = CudaGraphCapture(device).capture(add_one)
        x.fill_(10.0)
        replay()
        torch.cuda.synchronize(device)
        return bool((x == 11.0).all())
    except Exception as exc:  # a driver or runtime without graph support
        log.warning("CUDA graphs disabled on %s: %s", device, exc)
        return False


def graph_capture_for(setting: str, device: torch.device) -> GraphCapture | None:
    """The setting `cuda_graphs` ("auto" | "off") for a model on `device`: auto records
    decode graphs on CUDA where `cuda_graphs_work`, else the runner stays eager."""
    if setting not in ("auto", "off"):
        raise ValueError(f"cuda_graphs must be 'auto' or 'off', not {setting!r}")
    if setting == "auto" and cuda_graphs_work(device):
        return CudaGraphCapture(device)
    return None


class GraphRoutable(Protocol):
    """What the runner needs of `flora.serving.ServingModel` to route recorded rows."""

    routing: Any  # RoutingState: the plans the wrapped modules read
    merged_slot: int | None
    layout_version: int

    def set_routing(self, row_slots: Sequence[int | None]) -> None: ...

    def set_graph_routing(self, slots: torch.Tensor) -> None: ...


@dataclass
class _DecodeGraph:
    meta: torch.Tensor  # [B, 2 + blocks] int64: token id, position, block table
    slots: torch.Tensor  # [B] int32: adapter slot per row, -1 = base
    logits: torch.Tensor  # [B, V] float32, written by the replay
    adapters: bool  # recorded with the adapter kernels (reads `slots`)
    replay: Callable[[], None]
    inputs: _HostInputs
    replays: int = 0


class _HostInputs:
    """A graph's inputs on the host, filled in place through numpy and copied to the
    graph's buffers without blocking (from pinned memory on CUDA): building them with
    `torch.tensor` from nested lists cost more host time per step than the rest of the
    step's input work. `event` marks the last copy; the buffers are not written again
    before it has run."""

    def __init__(self, meta: torch.Tensor, slots: torch.Tensor) -> None:
        pin = meta.is_cuda
        self.meta = torch.empty(meta.shape, dtype=meta.dtype, pin_memory=pin)
        self.slots = torch.empty(slots.shape, dtype=slots.dtype, pin_memory=pin)
        self.meta_np, self.slots_np = self.meta.numpy(), self.slots.numpy()
        self.device = meta.device
        self.event = torch.cuda.Event() if pin else None

    def send(self, meta: torch.Tensor, slots: torch.Tensor | None) -> None:
        meta.copy_(self.meta, non_blocking=True)
        if slots is not None:
            slots.copy_(self.slots, non_blocking=True)
        if self.event is not None:  # on the stream the copies (and the replay) run on
            self.event.record(torch.cuda.current_stream(self.device))

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class GraphedPagedRunner(PagedRunner):
    """`PagedRunner` that replays recorded graphs for pure-decode steps (module docstring).

    `kv` must hold one block more than the block pool hands out: `scratch_block`, where
    padding rows write. `runtime` is the model's `ServingModel`."""

    def __init__(
        self,
        model: PreTrainedModel,
        kv: KVTensors,
        runtime: GraphRoutable,
        capture: GraphCapture,
        scratch_block: int,
        buckets: Sequence[int] = BATCH_BUCKETS,
        fused: FusedKernels | None = None,
    ) -> None:
        super().__init__(model, kv)
        # What the recorded graphs run in one kernel each (`fused`): decode attention,
        # RMSNorm and the rotary embedding; eager steps keep the torch ops.
        self.fused = fused
        if fused is not None:
            install_rms_norms(model, fused)
            install_rope(model, fused)
        if not kv.keys or (scratch_block + 1) * kv.block_size > kv.keys[0].shape[0]:
            raise ValueError(f"scratch block {scratch_block} is outside the KV storage")
        self.runtime = runtime
        self.capture = capture
        self.scratch_block = scratch_block
        self.buckets = tuple(sorted(buckets))
        context = getattr(model.config, "max_position_embeddings", None) or 1 << 15
        self.max_blocks = -(-context // kv.block_size)
        self.graphs: dict[tuple[int, int, bool], _DecodeGraph] = {}
        self.replays = 0
        self._layout = runtime.layout_version
        self._no_adapter_graphs = False  # a wrapped module has no graph plan
        self._failed = False

    @torch.inference_mode()
    def run(
        self,
        chunks: Sequence[ChunkInput],
        token_slots: Sequence[int | None],
        sample_rows: Sequence[int],
        route: Any,
    ) -> torch.Tensor:
        logits = None
        if list(sample_rows) == list(range(len(chunks))):
            logits = self.decode_on_device(chunks, token_slots)
        if logits is None:
            return super().run(chunks, token_slots, sample_rows, route)
        return logits.clone()

    @torch.inference_mode()
    def decode_on_device(
        self,
        chunks: Sequence[ChunkInput],
        token_slots: Sequence[int | None],
        tokens: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The float32 logits [n, V] of a step of n decode tokens through its recorded
        graph, or None when no graph serves it (the caller runs it eagerly). `tokens` [n]
        int64 on the device, when given, are the rows' input tokens in place of the
        chunks' `token_ids` (a step launched before the previous step's tokens reached the
        host, `paged.ahead`). The logits are the graph's own buffer: the next replay of
        the graph overwrites them, so read them (on the device's stream) before that."""
        graph = self._graph_for(chunks, token_slots)
        if graph is None:
            return None
        rows = self._fill(graph, chunks, token_slots)
        if tokens is not None:
            graph.meta[:rows, 0].copy_(tokens)
        graph.replay()
        graph.replays += 1
        self.replays += 1
        return graph.logits[:rows]

    # -- which graph ------------------------------------------------------------------------
    def _graph_for(
        self, chunks: Sequence[ChunkInput], token_slots: Sequence[int | None]
    ) -> _DecodeGraph | None:
        n = len(chunks)
        if self._failed or n == 0 or n > self.buckets[-1]:
            return None
        if any(len(c.token_ids) != 1 for c in chunks):
            return None
        blocks = max(c.start // self.kv.block_size + 1 for c in chunks)
        if blocks > self.max_blocks:
            return None
        # blocks per row: a power of two, or the model's whole context
        width = min(1 << (blocks - 1).bit_length(), self.max_blocks)
        merged = self.runtime.merged_slot
        adapters = any(s is not None and s != merged for s in token_slots)
        if adapters and merged is not None:
            return None  # the mode policy never mixes these; eager raises the error
        if self.runtime.layout_version != self._layout:
            self.graphs.clear()  # tensors the graphs read were re-bound
            self.capture.reset()
            self._layout = self.runtime.layout_version
            self._no_adapter_graphs = False
        if adapters and self._no_adapter_graphs:
            return None
        batch = next(b for b in self.buckets if b >= n)
        key = (batch, width, adapters)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._record(batch, width, adapters)
            if graph is not None:
                self.graphs[key] = graph
        return graph

    # -- recording ------------------------------------------------------------------------
    def _record(self, batch: int, width: int, adapters: bool) -> _DecodeGraph | None:
        device, bs = self.device, self.kv.block_size
        # Recorded with every row padding: the warm-up passes write the scratch block only.
        meta = torch.full((batch, 2 + width), self.scratch_block, dtype=torch.long, device=device)
        meta[:, :2] = 0  # token 0 at position 0
        slots = torch.full((batch,), -1, dtype=torch.int32, device=device)
        span = width * bs
        offsets = torch.arange(span, device=device)
        block_of, offset = offsets // bs, offsets % bs  # [L]: table column and offset
        write = torch.empty(batch, dtype=torch.long, device=device)
        gather = torch.empty(batch, span, dtype=torch.long, device=device)
        mask = torch.empty(batch, 1, 1, span, dtype=torch.bool, device=device)
        step = PagedStep.decode_only(self.kv, write, self.windows, self.fused)
        vocab = self._head.weight.shape[0]
        logits = torch.empty(batch, vocab, dtype=torch.float32, device=device)
        try:
            if adapters:
                self.runtime.set_graph_routing(slots)
            else:  # every row base (or on the merged slot, which runs as base)
                self.runtime.set_routing([self.runtime.merged_slot] * batch)
        except NotImplementedError as exc:
            log.info("decode graphs run base rows only: %s", exc)
            self._no_adapter_graphs = True
            return None
        routing = self.runtime.routing
        plans, rows, tokens, routed = (
            list(routing.plans),
            routing.rows,
            routing.tokens,
            routing.routed,
        )
        fused_norms = self.fused.recording() if self.fused else contextlib.nullcontext()
        ids, positions = meta[:, 0:1], meta[:, 1:2]  # [B, 1] each
        tables = meta[:, 2:]  # [B, width]

        def forward() -> None:
            # The plans this graph records (a CPU replay re-runs this Python).
            routing.plans, routing.rows, routing.tokens, routing.routed = (
                plans,
                rows,
                tokens,
                routed,
            )
            gather.copy_(tables[:, block_of] * bs + offset)
            mask.copy_((offsets <= positions).view(batch, 1, 1, span))
            write.copy_(gather.gather(1, positions).squeeze(1))
            step.set_decode(gather, mask, positions)  # sliding layers' keys, recorded too
            with fused_norms:  # the norms' and rotary kernels, for this recording only
                out = self._decoder(
                    input_ids=ids,
                    position_ids=positions,
                    use_cache=True,
                    flora_paged=step,
                    **{self._cache_kwarg: step},
                )
            logits.copy_(self._head(out.last_hidden_state)[:, -1, :].float())

        try:
            replay = self.capture.capture(forward)
        except Exception as exc:
            log.warning("CUDA graph recording failed, decode stays eager: %s", exc)
            self._failed = True
            return None
        return _DecodeGraph(meta, slots, logits, adapters, replay, _HostInputs(meta, slots))

    # -- per step -------------------------------------------------------------------------
    def _fill(
        self, graph: _DecodeGraph, chunks: Sequence[ChunkInput], token_slots: Sequence[int | None]
    ) -> int:
        """Copy the step's rows into the graph's buffers, padding rows as recorded (token 0
        at position 0 in the scratch block, base routing); returns the real rows."""
        host, bs = graph.inputs, self.kv.block_size
        host.wait()
        meta = host.meta_np
        meta.fill(self.scratch_block)
        meta[:, :2] = 0
        for i, chunk in enumerate(chunks):
            n = chunk.start // bs + 1
            meta[i, 0], meta[i, 1] = chunk.token_ids[0], chunk.start
            meta[i, 2 : 2 + n] = chunk.blocks[:n]
        if graph.adapters:
            merged = self.runtime.merged_slot
            host.slots_np.fill(-1)
            host.slots_np[: len(chunks)] = [
                -1 if s is None or s == merged else s for s in token_slots
            ]
        host.send(graph.meta, graph.slots if graph.adapters else None)
        return len(chunks)
