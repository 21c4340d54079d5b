"""CUDA graphs for engine v2's steps (setting `cuda_graphs`, docs/engine.md).

A step of a small model on a GPU is bound by kernel launches, not by arithmetic: every
layer is a few dozen small kernels and Python dispatches each. `GraphedPagedRunner`
records the whole forward (decoder, paged attention, adapter kernels, LM head) once per
shape and replays it with one launch. Every step that fits a graph replays one, decode
steps and steps with prefill chunks alike:

- **A token is a row.** The recorded forward has the layout [T, 1]: each of the step's T
  tokens is a row with its own token id, position, block table and adapter slot, as a
  decode row is. Every layer but attention acts on each token alone; attention writes the
  step's keys and values into the pool first, then each token reads its own sequence's
  keys up to its position, so a prefill chunk's tokens see each other causally exactly as
  in the eager runner's per-chunk SDPA. The fused decode attention kernel reads a row's
  keys through its slots (`fused.py`), so a prefill token costs what a decode row of the
  same context costs.
- **Buckets.** A step of n tokens runs as the smallest token bucket T >= n
  (`token_buckets`: vLLM's decode sizes up to 128, then wider ones up to the step's token
  budget) and the smallest power of two of blocks per row that covers its longest
  sequence. Steps over the largest bucket, sampling more than `max_samples` rows, past the
  model's context, or whose key index (`_gather_fits`) would be too large run eagerly
  (`PagedRunner.run`).
- **Static buffers.** A graph reads only tensors that outlive it: `meta` [T, 2 + blocks]
  (each token's id, position and block table, one host-to-device copy per step), `slots`
  [T] int32 (each token's adapter slot, -1 for base; read in place by the adapter kernels
  through `ServingModel.set_graph_routing`) and `sample` [min(T, max_samples)] (the
  tokens whose logits the step returns, padded with 0). The pool slots a token writes,
  the gather index and the key mask (and, for sliding-window layers, each row's keys
  within its window) are computed inside the graph from them. The logits go to one buffer
  all graphs share (one replays at a time, and each caller reads them before the next).
- **Padding rows** (n < T) get token 0 at position 0 with a block table of the scratch block
  only (an extra block of the KV storage that the block pool never hands out) and slot -1:
  they write and read the scratch block, never a real sequence's KV.
- **Two graphs per shape**: base rows only (every row base or on the merged slot: no adapter
  kernel is recorded, so merged and base steps cost the same) and with adapters.
- **What a graph bakes in** is the tensors it was recorded with. The slot banks are
  written in place when adapters load and the weights in place when a slot merges or
  unmerges, so both are read as they are at replay; a module newly wrapped or a bank grown
  to a larger rank re-binds tensors and bumps `ServingModel.layout_version`, which drops
  every graph (recorded again on next use).

The recording mechanism is injected (`capture.GraphCapture`): CUDA graphs on a device, a
CPU stand-in that re-runs the recorded Python on replay, so tests and
`bench/gpu_engine.py --dry-run` exercise everything but the CUDA call itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from flora_server.engine.paged.capture import GraphCapture
from flora_server.engine.paged.fused import FusedKernels
from flora_server.engine.paged.fused_install import (
    install_rms_norms,
    install_rope,
    install_sibling_gemms,
    install_silu_mlps,
)
from flora_server.engine.paged.runner import ChunkInput, KVTensors, PagedRunner, PagedStep

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

DECODE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
"""Step sizes in tokens a graph is recorded for up to 128 (vLLM's default decode sizes)."""

MAX_GATHER = 1 << 24
"""The most entries of a graph's key index (tokens x key positions): its int64 gather and
bool mask are 144 MiB at this size, in the graphs' shared pool."""

MAX_SAMPLES = 256
"""The most rows a graph returns logits for (a decode row, the last token of a prompt, a
position scored for prompt logprobs) unless the engine's batch is larger: the shared
float32 logits buffer is this many rows of the vocabulary (48 MiB for SmolLM2's 49k
tokens, 148 MiB for a 152k vocabulary), not the largest bucket's (8x that at a
2,048-token budget). A step sampling more runs eagerly."""

MAX_GATHERED_KV_BYTES = 1 << 28
"""Without the fused attention kernel the recorded attention gathers every token's keys
and values (`PagedStep.attend`'s SDPA path): steps whose gathered bytes exceed this run
eagerly, where a prefill chunk's SDPA reads its keys once."""


def token_buckets(budget: int) -> tuple[int, ...]:
    """The token buckets for a step budget of `budget` tokens: `DECODE_BUCKETS` below it,
    then 1.5x and 2x each power of two (192, 256, 384, 512, 768, ...) below it, then the
    budget itself (no step has more tokens). A padded step computes at most half again
    its tokens."""
    buckets = [b for b in DECODE_BUCKETS if b < budget]
    size = DECODE_BUCKETS[-1]
    while size < budget:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
        if size < budget:
            buckets.append(size)
    return (*buckets, budget)


class GraphRoutable(Protocol):
    """What the runner needs of `flora.serving.ServingModel` to route recorded rows."""

    routing: Any  # RoutingState: the plans the wrapped modules read
    merged_slot: int | None
    layout_version: int

    def set_routing(self, row_slots: Sequence[int | None]) -> None: ...

    def set_graph_routing(self, slots: torch.Tensor) -> None: ...


class _HostInputs:
    """A shape's inputs on the host, filled in place through numpy and copied to the
    graph's buffers without blocking (from pinned memory on CUDA): building them with
    `torch.tensor` from nested lists cost more host time per step than the rest of the
    step's input work. `event` marks the last copy; the buffers are not written again
    before it has run."""

    def __init__(
        self, device: torch.device, tokens: int, width: int, samples: int, scratch: int
    ) -> None:
        pin = device.type == "cuda"

        def host(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, pin_memory=pin)

        self.meta = host(tokens, 2 + width, dtype=torch.long)
        self.slots = host(tokens, dtype=torch.int32)
        self.sample = host(samples, dtype=torch.long)
        self.meta_np, self.slots_np = self.meta.numpy(), self.slots.numpy()
        self.sample_np = self.sample.numpy()
        self.device, self.scratch = device, scratch
        self.event = torch.cuda.Event() if pin else None

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def pad(self) -> None:
        """Every row padding: token 0 at position 0 with a block table of the scratch
        block only, base routing, sampling row 0 (once the last copy has run)."""
        self.wait()
        self.meta_np.fill(self.scratch)
        self.meta_np[:, :2] = 0
        self.slots_np.fill(-1)
        self.sample_np.fill(0)


class _StepInputs:
    """The static inputs of one shape (T tokens, `width` blocks per row), read by both its
    graphs (with and without adapter kernels): `meta` [T, 2 + width] int64 (token id,
    position, block table per row), `slots` [T] int32 (adapter slot per row, -1 = base),
    `sample` [S] int64 (the rows whose logits the step returns, padded with row 0)."""

    def __init__(
        self, device: torch.device, tokens: int, width: int, samples: int, scratch: int
    ) -> None:
        self.host = host = _HostInputs(device, tokens, width, samples, scratch)
        self.meta, self.slots, self.sample = (
            torch.empty(t.shape, dtype=t.dtype, device=device)
            for t in (host.meta, host.slots, host.sample)
        )
        self.pad()

    def pad(self) -> None:
        """Every row padding (`_HostInputs.pad`): what a graph is recorded with, so the
        forwards run while recording write the scratch block only, never the keys of the
        sequences the buffers last held."""
        self.host.pad()
        self.send(adapters=True)

    def send(self, adapters: bool) -> None:
        host = self.host
        self.meta.copy_(host.meta, non_blocking=True)
        self.sample.copy_(host.sample, non_blocking=True)
        if adapters:
            self.slots.copy_(host.slots, non_blocking=True)
        if host.event is not None:  # on the stream the copies (and the replay) run on
            host.event.record(torch.cuda.current_stream(host.device))


@dataclass
class _StepGraph:
    inputs: _StepInputs
    adapters: bool  # recorded with the adapter kernels (reads `inputs.slots`)
    replay: Callable[[], None]
    replays: int = 0


class GraphedPagedRunner(PagedRunner):
    """`PagedRunner` that replays recorded graphs for every step that fits one (module
    docstring).

    `kv` must hold one block more than the block pool hands out: `scratch_block`, where
    padding rows write. `runtime` is the model's `ServingModel`; `budget` the step's token
    budget (`max_num_batched_tokens`), which sets the token buckets; `max_samples` the
    most rows a step samples from a graph (at least the engine's batch, so every decode
    step fits)."""

    def __init__(
        self,
        model: PreTrainedModel,
        kv: KVTensors,
        runtime: GraphRoutable,
        capture: GraphCapture,
        scratch_block: int,
        budget: int = 512,
        buckets: Sequence[int] | None = None,
        fused: FusedKernels | None = None,
        max_samples: int = MAX_SAMPLES,
    ) -> None:
        super().__init__(model, kv)
        # What the recorded graphs run in one kernel each (`fused`): paged attention,
        # RMSNorm, the rotary embedding and SiLU-and-multiply (the norms, SiLU-multiply and
        # attention computing adapter deltas too, where the plans take them), and one GEMM
        # for each set of sibling projections; eager steps keep the torch ops.
        self.fused = fused
        if fused is not None:
            install_rms_norms(model, fused)
            install_rope(model, fused)
            install_silu_mlps(model, fused)
            install_sibling_gemms(model, fused)
        if not kv.keys or (scratch_block + 1) * kv.block_size > kv.keys[0].shape[0]:
            raise ValueError(f"scratch block {scratch_block} is outside the KV storage")
        self.runtime = runtime
        self.capture = capture
        self.scratch_block = scratch_block
        self.buckets = tuple(sorted(buckets or token_buckets(budget)))
        context = getattr(model.config, "max_position_embeddings", None) or 1 << 15
        self.max_blocks = -(-context // kv.block_size)
        heads = kv.keys[0].shape[1] * kv.keys[0].shape[2]
        self._kv_bytes_per_key = 2 * heads * kv.keys[0].element_size()  # a key and a value
        self.graphs: dict[tuple[int, int, bool], _StepGraph] = {}
        self._inputs: dict[tuple[int, int], _StepInputs] = {}
        self.max_samples = max_samples
        self._logits: torch.Tensor | None = None  # [samples, V] float32, shared
        self.replays = 0  # steps run through a graph
        self.eager_steps = 0  # steps no graph served
        self._layout = self._recorded_layout()
        self._no_adapter_graphs = False  # a wrapped module has no graph plan
        self._failed = False  # the first recording failed: this model is not recorded here
        self._recorded = 0  # recordings that succeeded
        self._unrecorded: set[tuple[int, int, bool]] = set()  # shapes whose recording failed

    @torch.inference_mode()
    def run(
        self,
        chunks: Sequence[ChunkInput],
        token_slots: Sequence[int | None],
        sample_rows: Sequence[int],
        route: Any,
    ) -> torch.Tensor:
        logits = self._replay(chunks, token_slots, sample_rows)
        if logits is None:
            self.eager_steps += 1
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
        host, `paged.ahead`). The logits are the graphs' shared buffer: the next replay
        overwrites them, so read them (on the device's stream) before that."""
        if any(len(c.token_ids) != 1 for c in chunks):
            raise ValueError("decode_on_device takes decode chunks of one token each")
        return self._replay(chunks, token_slots, range(len(chunks)), tokens)

    def _replay(
        self,
        chunks: Sequence[ChunkInput],
        token_slots: Sequence[int | None],
        sample_rows: Sequence[int],
        tokens: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        graph = self._graph_for(chunks, token_slots, len(sample_rows))
        if graph is None:
            return None
        self._fill(graph, chunks, token_slots, sample_rows)
        if tokens is not None:
            graph.inputs.meta[: len(chunks), 0].copy_(tokens)
        graph.replay()
        graph.replays += 1
        self.replays += 1
        assert self._logits is not None  # allocated by the first recording
        return self._logits[: len(sample_rows)]

    # -- which graph ------------------------------------------------------------------------
    def _graph_for(
        self, chunks: Sequence[ChunkInput], token_slots: Sequence[int | None], samples: int
    ) -> _StepGraph | None:
        n = len(token_slots)
        if self._failed or n == 0 or n > self.buckets[-1] or samples > self.max_samples:
            return None
        bs = self.kv.block_size
        blocks = max((c.start + len(c.token_ids) - 1) // bs + 1 for c in chunks)
        if blocks > self.max_blocks:
            return None
        # blocks per row: a power of two, or the model's whole context
        width = min(1 << (blocks - 1).bit_length(), self.max_blocks)
        tokens = next(b for b in self.buckets if b >= n)
        if not self._gather_fits(tokens, width * bs):
            return None
        merged = self.runtime.merged_slot
        adapters = any(s is not None and s != merged for s in token_slots)
        if adapters and merged is not None:
            return None  # the mode policy never mixes these; eager raises the error
        if self._recorded_layout() != self._layout:
            self.drop_graphs()  # tensors the graphs read were re-bound, or a setting changed
            self._layout = self._recorded_layout()
        if adapters and self._no_adapter_graphs:
            return None
        key = (tokens, width, adapters)
        graph = self.graphs.get(key)
        if graph is None and key not in self._unrecorded:
            graph = self._record(tokens, width, adapters)
            if graph is not None:
                self.graphs[key] = graph
        return graph

    def drop_graphs(self) -> None:
        """Drop every recorded graph: each is recorded again on its next use. The runner
        does so itself when what it sees of their inputs changes (`_recorded_layout`);
        this is for a setting it cannot see (the adapter kernel's tile sizes, say)."""
        self.graphs.clear()
        self.capture.reset()  # their pool goes with them: a failed shape may fit now
        self._unrecorded.clear()
        self._no_adapter_graphs = False

    def _recorded_layout(self) -> tuple[int, tuple[object, ...]]:
        """What recorded graphs bake in beyond their shape: the served modules' layout
        and the fused kernels' settings (`FusedKernels.settings`: changing one drops the
        graphs, recorded again on use)."""
        return self.runtime.layout_version, () if self.fused is None else self.fused.settings

    def _gather_fits(self, tokens: int, span: int) -> bool:
        """Whether a graph of `tokens` rows over `span` key positions stays within the
        index limit, and, without the fused attention kernel, the gathered keys' limit."""
        if tokens * span > MAX_GATHER:
            return False
        return self.fused is not None or (
            tokens * span * self._kv_bytes_per_key <= MAX_GATHERED_KV_BYTES
        )

    # -- recording ------------------------------------------------------------------------
    def _record(self, tokens: int, width: int, adapters: bool) -> _StepGraph | None:
        device, bs = self.device, self.kv.block_size
        samples = min(tokens, self.max_samples)
        inputs = self._inputs.get((tokens, width))
        if inputs is None:
            inputs = self._inputs[tokens, width] = _StepInputs(
                device, tokens, width, samples, self.scratch_block
            )
        if self._logits is None:
            vocab = self._head.weight.shape[0]
            rows = min(self.buckets[-1], self.max_samples)
            self._logits = torch.empty(rows, vocab, dtype=torch.float32, device=device)
        logits = self._logits[:samples]
        inputs.pad()  # the other graph of this shape may have left a step's rows there
        span = width * bs
        offsets = torch.arange(span, device=device)
        block_of, offset = offsets // bs, offsets % bs  # [L]: table column and offset
        step = PagedStep.decode_only(self.kv, tokens, device, self.windows, self.fused)
        try:
            if adapters:
                self.runtime.set_graph_routing(inputs.slots)
            else:  # every row base (or on the merged slot, which runs as base)
                self.runtime.set_routing([self.runtime.merged_slot] * tokens)
        except NotImplementedError as exc:
            log.info("graphs run base rows only: %s", exc)
            self._no_adapter_graphs = True
            return None
        routing = self.runtime.routing
        plans, rows, routed_tokens, routed = (
            list(routing.plans),
            routing.rows,
            routing.tokens,
            routing.routed,
        )
        fused_norms = self.fused.recording() if self.fused else contextlib.nullcontext()
        meta, sample = inputs.meta, inputs.sample
        ids, positions = meta[:, 0:1], meta[:, 1:2]  # [T, 1] each
        tables = meta[:, 2:]  # [T, width]

        def forward() -> None:
            # The plans this graph records (a CPU replay re-runs this Python).
            routing.plans, routing.rows, routing.tokens, routing.routed = (
                plans,
                rows,
                routed_tokens,
                routed,
            )
            # The key index is an intermediate of the recording (from the graphs' shared
            # pool, dead between replays like the activations, `step.release`), not a
            # tensor of its own per graph: up to 144 MiB (`MAX_GATHER`) each.
            gather = tables[:, block_of] * bs + offset  # [T, L] pool slots
            mask = (offsets <= positions).view(tokens, 1, 1, span)
            step.write = gather.gather(1, positions).squeeze(1)
            step.set_decode(gather, mask, positions)  # sliding layers' keys, recorded too
            with fused_norms:  # the norms' and rotary kernels, for this recording only
                out = self._decoder(
                    input_ids=ids,
                    position_ids=positions,
                    use_cache=True,
                    flora_paged=step,
                    **{self._cache_kwarg: step},
                )
            hidden = out.last_hidden_state.index_select(0, sample)  # [S, 1, H]
            logits.copy_(self._head(hidden)[:, -1, :].float())
            step.release()

        try:
            replay = self.capture.capture(forward)
        except Exception as exc:
            # The first recording failing says the model cannot be recorded here; a later
            # one (a wide shape out of memory, say) costs only its own shape.
            if self._recorded == 0:
                log.warning("CUDA graph recording failed, every step stays eager: %s", exc)
                self._failed = True
            else:
                log.warning(
                    "recording the graph of %d tokens x %d blocks failed, steps of that "
                    "shape run eagerly: %s", tokens, width, exc,
                )  # fmt: skip
                self._unrecorded.add((tokens, width, adapters))
            return None
        self._recorded += 1
        return _StepGraph(inputs, adapters, replay)

    # -- per step -------------------------------------------------------------------------
    def _fill(
        self,
        graph: _StepGraph,
        chunks: Sequence[ChunkInput],
        token_slots: Sequence[int | None],
        sample_rows: Sequence[int],
    ) -> None:
        """Copy the step's tokens into the graph's buffers (a row per token; padding rows
        as recorded: token 0 at position 0 in the scratch block, base routing)."""
        inputs, bs = graph.inputs, self.kv.block_size
        host = inputs.host
        host.pad()
        meta = host.meta_np
        row = 0
        for chunk in chunks:
            n, start = len(chunk.token_ids), chunk.start
            blocks = (start + n - 1) // bs + 1
            if n == 1:
                meta[row, 0], meta[row, 1] = chunk.token_ids[0], start
            else:
                meta[row : row + n, 0] = chunk.token_ids
                meta[row : row + n, 1] = np.arange(start, start + n)
            meta[row : row + n, 2 : 2 + blocks] = chunk.blocks[:blocks]
            row += n
        if graph.adapters:
            merged = self.runtime.merged_slot
            host.slots_np[: len(token_slots)] = [
                -1 if s is None or s == merged else s for s in token_slots
            ]
        host.sample_np[: len(sample_rows)] = sample_rows
        inputs.send(graph.adapters)
