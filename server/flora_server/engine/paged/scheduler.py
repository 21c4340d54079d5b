"""Which tokens run in the next step: a per-step token budget over running sequences.

Each step (as vLLM's scheduler does):

1. Running sequences that are decoding get their one token first, oldest first. When the
   pool cannot hold a decoding sequence's next position, the most recently started
   sequence is preempted (possibly the one asking) until it fits.
2. Running sequences still prefilling get their next prompt chunk, oldest first, each
   chunk as long as the budget left allows (chunked prefill: a long prompt goes in
   pieces interleaved with the decode steps of the others).
3. Waiting sequences start in FIFO order while the budget, `max_running` and the pool
   allow: first the longest cached prefix is attached (`BlockPool.match_prefix`; not for
   a sequence that asked for prompt logprobs, which computes every position), then
   blocks for the first chunk are allocated. A sequence whose first chunk does not fit
   waits (and keeps its place at the head: later ones do not overtake it).

Preemption is by recompute: the victim's blocks are released (its full blocks stay in
the prefix cache, so a recompute often finds them) and it goes back to the head of the
waiting queue with its prompt plus the tokens it generated so far as the new prompt; its
next step's logits continue exactly where it stopped. No request ever fails because the
pool is full; a request that alone needs more blocks than the pool has is refused at
admission by the engine (`PagedScheduler.fits_alone`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flora_server.engine.paged.kv_cache import BlockPool, BlockTable


@dataclass(eq=False)
class SequenceState:
    """A request's token ids (prompt, then generated) and its KV blocks."""

    row: Any  # the engine's per-request state (RowState); opaque here
    token_ids: list[int]
    table: BlockTable
    arrival: int = 0
    preemptions: int = 0
    looked_up: bool = False  # counted in the prefix-cache queries since (re)starting
    # False while the sequence needs the logits of every prompt position (prompt logprobs):
    # it then computes its whole prompt, though the blocks it fills are still cached.
    reads_prefix_cache: bool = True

    @property
    def num_computed(self) -> int:
        return self.table.num_computed

    @property
    def remaining(self) -> int:
        """Positions still to compute before the next token can be sampled."""
        return len(self.token_ids) - self.table.num_computed


@dataclass(frozen=True)
class ScheduledChunk:
    """`count` tokens of `seq` starting at position `start`; `sample` when the chunk
    reaches the sequence's last token (its logits give the next token)."""

    seq: SequenceState
    start: int
    count: int

    @property
    def sample(self) -> bool:
        return self.start + self.count == len(self.seq.token_ids)


@dataclass
class StepPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[SequenceState] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.count for c in self.chunks)


class PagedScheduler:
    def __init__(self, pool: BlockPool, token_budget: int, max_running: int) -> None:
        if token_budget < 1:
            raise ValueError("the step token budget must be at least 1")
        self.pool = pool
        self.token_budget = token_budget
        self.max_running = max_running
        self.waiting: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []  # in start order
        self._arrivals = 0

    def add(
        self, row: Any, prompt: Sequence[int], adapter_key: str, reads_prefix_cache: bool = True
    ) -> SequenceState:
        seq = SequenceState(
            row,
            list(prompt),
            BlockTable(adapter_key),
            arrival=self._arrivals,
            reads_prefix_cache=reads_prefix_cache,
        )
        self._arrivals += 1
        self.waiting.append(seq)
        return seq

    def fits_alone(self, num_tokens: int) -> bool:
        """Whether a sequence of `num_tokens` positions fits the whole pool."""
        return self.pool.blocks_for(num_tokens) <= self.pool.num_blocks

    @property
    def sequences(self) -> list[SequenceState]:
        return [*self.running, *self.waiting]

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.token_budget
        # 1. decode tokens of running sequences, oldest first.
        for seq in list(self.running):
            if budget == 0 or seq.remaining != 1 or seq not in self.running:
                continue
            if not self._grow_or_preempt(seq, plan):
                continue  # `seq` itself was preempted
            plan.chunks.append(ScheduledChunk(seq, seq.num_computed, 1))
            budget -= 1
        # 2. prefill chunks of running sequences; one that cannot get a single block
        #    preempts newer sequences (the oldest always progresses: no deadlock).
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.remaining <= 1 or seq not in self.running:
                continue
            count = min(seq.remaining, budget)
            if not self.pool.grow(seq.table, seq.num_computed + count):
                count = self._fit(seq, budget)
                if count == 0:
                    if not self._grow_or_preempt(seq, plan):
                        continue
                    count = self._fit(seq, budget)
            plan.chunks.append(ScheduledChunk(seq, seq.num_computed, count))
            budget -= count
        # 3. start waiting sequences (FIFO; the head is never overtaken).
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if seq.reads_prefix_cache:
                self.pool.match_prefix(seq.table, seq.token_ids, count=not seq.looked_up)
            seq.looked_up = True
            count = min(seq.remaining, budget)
            if not self.pool.grow(seq.table, seq.num_computed + count):
                count = self._fit(seq, budget)
                if count == 0:
                    # Hold nothing while waiting: the blocks stay cached for the retry.
                    self.pool.release(seq.table)
                    break
            self.waiting.popleft()
            self.running.append(seq)
            plan.chunks.append(ScheduledChunk(seq, seq.num_computed, count))
            budget -= count
        return plan

    def _fit(self, seq: SequenceState, limit: int) -> int:
        """The most tokens (at most `limit`) `seq` can compute with the blocks available
        now; grows its table to hold them."""
        room = (len(seq.table.blocks) + self.pool.num_available) * self.pool.block_size
        count = min(seq.remaining, limit, room - seq.num_computed)
        if count <= 0:
            return 0
        ok = self.pool.grow(seq.table, seq.num_computed + count)
        assert ok
        return count

    def _grow_or_preempt(self, seq: SequenceState, plan: StepPlan) -> bool:
        """Room for one more position of `seq`, preempting the newest running sequences
        (never one already scheduled in this step) until it fits. False when `seq` was the
        one preempted."""
        while not self.pool.grow(seq.table, seq.num_computed + 1):
            scheduled = {id(c.seq) for c in plan.chunks}
            victims = [s for s in self.running if id(s) not in scheduled]
            victim = max(victims, key=lambda s: s.arrival)
            self.preempt(victim)
            plan.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: SequenceState) -> None:
        """Free `seq`'s blocks and queue it first for recompute."""
        self.running.remove(seq)
        self.pool.release(seq.table)
        seq.preemptions += 1
        seq.looked_up = False
        self.waiting.appendleft(seq)

    def finish(self, seq: SequenceState) -> None:
        """Forget `seq` (finished, cancelled or failed) and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.table)

    def computed(self, chunk: ScheduledChunk) -> None:
        """Record that `chunk` ran: its positions now hold KV."""
        chunk.seq.table.num_computed = chunk.start + chunk.count
        self.pool.commit_full_blocks(chunk.seq.table, chunk.seq.token_ids)
