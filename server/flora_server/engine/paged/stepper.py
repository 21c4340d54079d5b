"""`PagedStepper`: one step of engine v2 on the worker thread.

It keeps v1's `Stepper` contract (the worker loop, mode policy, sampling, text and stop
handling, finishing and failing rows are inherited unchanged) and replaces what a step
runs: admitted rows join the `PagedScheduler`; each step runs the token plan it returns
(decode tokens and prefill chunks packed into one forward by `PagedRunner`), samples the
rows whose chunk reached their last token, and releases the blocks of finished rows.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from flora_server.engine.adapter_cache import AdapterCache
from flora_server.engine.hooks import EngineMetrics
from flora_server.engine.paged.kv_cache import BASE_KEY, BlockTable
from flora_server.engine.paged.runner import ChunkInput, PagedRunner
from flora_server.engine.paged.scheduler import PagedScheduler, SequenceState, StepPlan
from flora_server.engine.policy import choose_mode, update_streak
from flora_server.engine.requests import RowState
from flora_server.engine.runtime import AdapterRuntime
from flora_server.engine.stepper import Stepper

if TYPE_CHECKING:
    from transformers import PreTrainedModel


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

    @property
    def busy(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    @property
    def rows(self) -> list[RowState]:
        return [seq.row for seq in self.scheduler.sequences]

    def step(self, admitted: Sequence[RowState], waiting: Sequence[str | None]) -> None:
        for row in admitted:
            self.scheduler.add(row, row.request.prompt_ids, prefix_key(row))
        running = [r.adapter_id for r in self.rows]
        self._streak_adapter, self._streak = update_streak(
            self._streak_adapter, self._streak, running
        )
        decision = choose_mode(
            running, waiting, self.merged, self._streak, merge_after_steps=self.merge_after_steps
        )
        self._set_merged(decision.merge, admitted)
        self.mode = decision.mode
        plan = self.scheduler.schedule()
        self.preemptions += len(plan.preempted)
        if plan.chunks:
            try:
                self._run(plan)
            except Exception as exc:
                self.fail([c.seq.row for c in plan.chunks], exc)
        self.drop_finished()

    def _run(self, plan: StepPlan) -> None:
        started = time.monotonic()
        chunks, slots, sample_rows, sampled = [], [], [], []
        for chunk in plan.chunks:
            seq = chunk.seq
            tokens = seq.token_ids[chunk.start : chunk.start + chunk.count]
            chunks.append(ChunkInput(tokens, chunk.start, seq.table.blocks))
            slots.extend([seq.row.slot] * chunk.count)
            if chunk.sample:
                sample_rows.append(len(slots) - 1)
                sampled.append(seq)
        logits = self.runner.run(chunks, slots, sample_rows, self.runtime.set_routing)
        for chunk in plan.chunks:
            self.scheduler.computed(chunk)
        if sampled:
            picked = self._sample([s.row for s in sampled], logits)  # [len(sampled)]
            for seq, token in zip(sampled, picked.tolist(), strict=True):
                seq.token_ids.append(token)
        self.metrics.on_step(self.mode, len(plan.chunks), time.monotonic() - started)
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

    def fail_all(self, exc: BaseException) -> None:
        self.fail(self.rows, exc)
        for seq in self.scheduler.sequences:
            self.scheduler.finish(seq)

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


def prefix_key(row: RowState) -> str:
    """What a row's KV blocks are keyed by besides its tokens: the content of its adapter
    (the sha256 of the stored bytes its slot holds, set at admission), never the adapter's
    name, so an adapter overwritten under the same id never reuses the old blocks. A row
    whose source reported no digest shares no blocks."""
    if row.slot is None:
        return BASE_KEY
    return row.adapter_sha256 or f"unkeyed:{row.request.request_id}"
