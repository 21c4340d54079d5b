"""`PagedStepper`: one step of engine v2 on the worker thread.

It keeps v1's `Stepper` contract (the worker loop, mode policy, sampling, text and stop
handling, finishing and failing rows are inherited unchanged) and replaces what a step
runs: admitted rows join the `PagedScheduler`; each step runs the token plan it returns
(decode tokens and prefill chunks packed into one forward by `PagedRunner`), samples the
rows whose chunk reached their last token, and releases the blocks of finished rows.
Prompt logprobs are gathered from the prefill chunks' logits (`prompt_scores`). A packed
forward that raises is retried chunk by chunk, so only the request whose chunk fails alone
is failed (v1 does the same for its batched prefill).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from flora_server.engine.adapter_cache import AdapterCache
from flora_server.engine.hooks import EngineMetrics
from flora_server.engine.paged.ahead import Ahead, DeviceTokens, pipelines
from flora_server.engine.paged.graphs import GraphedPagedRunner
from flora_server.engine.paged.kv_cache import BASE_KEY, BlockTable
from flora_server.engine.paged.prompt_scores import PromptScores
from flora_server.engine.paged.runner import ChunkInput, PagedRunner
from flora_server.engine.paged.scheduler import PagedScheduler, ScheduledChunk, SequenceState
from flora_server.engine.requests import RowState
from flora_server.engine.runtime import AdapterRuntime
from flora_server.engine.stepper import Stepper

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


class PagedStepper(Stepper):
    def __init__(
        self,
        model: PreTrainedModel,
        runtime: AdapterRuntime,
        cache: AdapterCache,
        eos_ids: set[int],
        metrics: EngineMetrics,
        merge_after_steps: int | None,
        *,
        runner: PagedRunner,
        scheduler: PagedScheduler,
    ) -> None:
        super().__init__(model, runtime, cache, eos_ids, metrics, merge_after_steps)
        self.runner = runner
        self.scheduler = scheduler
        self.preemptions = 0
        self._scores: dict[SequenceState, PromptScores] = {}  # prompts still being scored
        self._ahead: Ahead | None = None  # the decode step launched ahead (`paged.ahead`)
        self.decode_ahead = True  # pipeline graphed greedy decode steps where they can be
        self.ahead_launched = 0
        self.ahead_adopted = 0

    @property
    def busy(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    @property
    def rows(self) -> list[RowState]:
        return [seq.row for seq in self.scheduler.sequences]

    def step(self, admitted: Sequence[RowState], waiting: Sequence[str | None]) -> None:
        for row in admitted:
            scored = row.request.params.prompt_logprobs
            seq = self.scheduler.add(
                row, row.request.prompt_ids, prefix_key(row), reads_prefix_cache=not scored
            )
            if scored:
                n = row.request.params.top_logprobs
                self._scores[seq] = PromptScores(row.request.prompt_ids, n, self.runner.device)
        self._decide_mode(self.rows, waiting)  # the admitted rows are in the scheduler
        plan = self.scheduler.schedule()
        self.preemptions += len(plan.preempted)
        ahead, self._ahead = self._ahead, None
        if plan.chunks:
            started = time.monotonic()
            if not self._decode_pipelined(plan.chunks, ahead):
                for chunks, logits in self._forward_isolated(plan.chunks):
                    try:
                        self._finish_chunks(chunks, logits)
                    except Exception as exc:
                        self.fail([c.seq.row for c in chunks], exc)
            self.metrics.on_step(self.mode, len(plan.chunks), time.monotonic() - started)
        self.drop_finished()

    # -- decode one step ahead (`paged.ahead`) ----------------------------------------------
    def _decode_pipelined(self, chunks: list[ScheduledChunk], ahead: Ahead | None) -> bool:
        """Run `chunks` as a pipelined decode step when they are one: take the tokens of
        the step launched ahead if it computed this plan (else replay the plan's graph and
        select on the device), launch the next step, then read and emit this step's
        tokens. False when the plan is not such a step; nothing has run then."""
        runner = self.runner
        if not self.decode_ahead or not isinstance(runner, GraphedPagedRunner):
            return False
        if not all(c.count == 1 and c.sample and pipelines(c.seq.row) for c in chunks):
            return False
        order = ahead.order_for(chunks, forward_state(runner)) if ahead is not None else None
        if ahead is not None and order is not None:
            tokens = ahead.tokens
            self.ahead_adopted += 1
        else:
            try:
                logits = runner.decode_on_device(
                    [chunk_input(c) for c in chunks], [c.seq.row.slot for c in chunks]
                )
            except Exception as exc:  # the usual path retries it, row by row if need be
                log.warning("a graphed decode step failed (%s); running it again", exc)
                return False
            if logits is None:
                return False
            tokens, order = DeviceTokens(logits), list(range(len(chunks)))
        try:
            self._ahead = self._launch_ahead(runner, chunks, tokens, order)
        except Exception as exc:  # this step's tokens stand; the next step runs as usual
            log.warning("launching the next decode step ahead failed: %s", exc)
        values = tokens.host()
        self._emit_selected(chunks, [values[i] for i in order])
        return True

    def _launch_ahead(
        self,
        runner: GraphedPagedRunner,
        chunks: list[ScheduledChunk],
        tokens: DeviceTokens,
        order: list[int],
    ) -> Ahead | None:
        """Launch the step after `chunks` for their rows that go on: each row's input token
        is its entry `order[k]` of `tokens`, still on the device. None when some row's next
        position gets no block (the scheduler preempts at the next step) or no graph
        serves the step."""
        keep = [
            k
            for k, c in enumerate(chunks)
            if len(c.seq.row.generated) + 1 < c.seq.row.handle.max_new_tokens
            and not c.seq.row.handle.cancelled
        ]
        if not keep:
            return None
        kept = [chunks[k] for k in keep]
        pool = self.scheduler.pool
        if not all(pool.grow(c.seq.table, c.start + 2) for c in kept):
            return None
        index = [order[k] for k in keep]
        device = tokens.device
        if index != list(range(device.shape[0])):
            # from pinned memory: a copy from pageable memory would wait for the device
            rows = torch.tensor(index, pin_memory=device.is_cuda)
            device = device.index_select(0, rows.to(device.device, non_blocking=True))
        inputs = [ChunkInput((0,), c.start + 1, c.seq.table.blocks) for c in kept]
        logits = runner.decode_on_device(inputs, [c.seq.row.slot for c in kept], device)
        if logits is None:
            return None
        self.ahead_launched += 1
        return Ahead(
            tuple(c.seq for c in kept),
            tuple(c.start + 1 for c in kept),
            DeviceTokens(logits),
            forward_state(runner),
        )

    def _emit_selected(self, chunks: Sequence[ScheduledChunk], tokens: Sequence[int]) -> None:
        """Record a decode step whose tokens were selected on the device (-1: the row's
        logits were not finite) and emit them, as `_finish_chunks` does after sampling."""
        bad = []
        for chunk, token in zip(chunks, tokens, strict=True):
            self.scheduler.computed(chunk)
            row = chunk.seq.row
            if token < 0:
                bad.append(row)
                continue
            chunk.seq.token_ids.append(token)
            if row.finished is None:
                self._advance(row, token, None)
        self.fail_non_finite(bad)
        self.metrics.on_tokens(len(chunks))

    def _forward_isolated(
        self, chunks: list[ScheduledChunk]
    ) -> list[tuple[list[ScheduledChunk], torch.Tensor]]:
        """The step's forward, packed. If it raises (out of memory, a kernel refusing one
        row's input), each chunk is run again alone so that only the request whose chunk
        still fails is failed. A failed forward wrote only the positions it was computing
        (num_computed has not moved), so running them again is exact."""
        try:
            return [(chunks, self._forward(chunks))]
        except Exception as exc:
            if len(chunks) == 1:
                self.fail([chunks[0].seq.row], exc)
                return []
            log.warning(
                "a packed step of %d chunks failed (%s); retrying each alone", len(chunks), exc
            )
        done = []
        for chunk in chunks:
            try:
                done.append(([chunk], self._forward([chunk])))
            except Exception as exc:
                self.fail([chunk.seq.row], exc)
        return done

    def _forward(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
        """Run `chunks` packed; float32 logits [S + P, V]: first the S chunks that sample
        (in order), then every position scored for prompt logprobs (in order)."""
        inputs: list[ChunkInput] = []
        slots: list[int | None] = []  # the adapter slot of each packed token
        sample_rows: list[int] = []
        score_rows: list[int] = []
        for chunk in chunks:
            seq = chunk.seq
            first = len(slots)
            inputs.append(chunk_input(chunk))
            slots.extend([seq.row.slot] * chunk.count)
            if chunk.sample:
                sample_rows.append(len(slots) - 1)
            scores = self._scores.get(seq)
            if scores is not None:
                score_rows.extend(
                    first + p - chunk.start for p in scores.positions(chunk.start, chunk.count)
                )
        return self.runner.run(inputs, slots, sample_rows + score_rows, self.runtime.set_routing)

    def _finish_chunks(self, chunks: Sequence[ScheduledChunk], logits: torch.Tensor) -> None:
        """Record what `chunks` computed, their prompt scores, then sample the rows whose
        chunk reached the sequence's last token."""
        sampled = [c.seq for c in chunks if c.sample]
        offset = len(sampled)
        for chunk in chunks:
            self.scheduler.computed(chunk)
            seq = chunk.seq
            scores = self._scores.get(seq)
            if scores is None:
                continue
            positions = scores.positions(chunk.start, chunk.count)
            if positions:
                scores.add(chunk.start, logits[offset : offset + len(positions)])
                offset += len(positions)
            if scores.complete:
                seq.row.prompt_logprobs = scores.entries(seq.row.text.decode)
                seq.reads_prefix_cache = True
                del self._scores[seq]
        if sampled:
            picked = self._sample([s.row for s in sampled], logits[: len(sampled)])
            for seq, token in zip(sampled, picked.tolist(), strict=True):
                seq.token_ids.append(token)
        self.metrics.on_tokens(len(sampled))

    def drop_finished(self) -> None:
        now = time.monotonic()
        for seq in self.scheduler.sequences:
            row = seq.row
            if row.finished is None and row.handle.cancelled:
                self.finish(row, "cancelled")
            elif row.finished is None and row.handle.expired(now):
                self.finish(row, "deadline")
            if row.finished is not None:
                self.scheduler.finish(seq)
                self._scores.pop(seq, None)

    def fail_all(self, exc: BaseException) -> None:
        self._ahead = None
        self.fail(self.rows, exc)
        for seq in self.scheduler.sequences:
            self.scheduler.finish(seq)
        self._scores.clear()

    def warm_up(self, token_id: int) -> None:
        """One single-token forward on the base model through the pool, discarded."""
        table = BlockTable("warm-up")
        self.scheduler.pool.grow(table, 1)
        try:
            self.runner.run(
                [ChunkInput([token_id], 0, table.blocks)], [None], [0], self.runtime.set_routing
            )
        finally:
            self.scheduler.pool.release(table)

    def sequence_of(self, row: RowState) -> SequenceState | None:
        return next((s for s in self.scheduler.sequences if s.row is row), None)


def chunk_input(chunk: ScheduledChunk) -> ChunkInput:
    """What the runner needs of a scheduled chunk: its tokens, position and block table."""
    seq = chunk.seq
    return ChunkInput(
        seq.token_ids[chunk.start : chunk.start + chunk.count], chunk.start, seq.table.blocks
    )


def forward_state(runner: GraphedPagedRunner) -> tuple[object, ...]:
    """What a decode forward reads that may change between two steps: the adapter merged
    into the weights and the served modules' layout."""
    return (runner.runtime.merged_slot, runner.runtime.layout_version)


def prefix_key(row: RowState) -> str:
    """What a row's KV blocks are keyed by besides its tokens: the content of its adapter
    (the sha256 of the stored bytes its slot holds, set at admission), never the adapter's
    name, so an adapter overwritten under the same id never reuses the old blocks. A row
    whose source reported no digest shares no blocks."""
    if row.slot is None:
        return BASE_KEY
    return row.adapter_sha256 or f"unkeyed:{row.request.request_id}"
