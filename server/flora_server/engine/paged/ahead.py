"""Decode one step ahead: the device runs step n + 1 while the host handles step n's tokens.

A graphed decode step on a GPU is a few milliseconds of device work and about as much host
work (scheduling, filling the graph's inputs, reading the tokens back, detokenising,
stop checks, events). Run one after the other, a step costs their sum. vLLM's async
scheduling overlaps them; this is the same idea, kept to the steps where it is exact:

1. A pure-decode step whose rows are all plain greedy (`pipelines`: no sampling, logprobs,
   grammar or repetition penalty, which read host state or advance a generator) runs
   through its recorded graph and selects its tokens on the device (`DeviceTokens`: the
   argmax, or -1 for a row whose logits are not finite), starting their copy to the host.
2. Before waiting for that copy, the stepper launches the next step for the same rows
   (`Ahead`): each row's next position gets its block, and the graph reads the rows' input
   tokens from step 1's device tensor, not from the host. Rows that reach their token
   budget with step 1's token are left out (they finish for certain).
3. The host then reads step 1's tokens and emits them while the device computes step 2.
4. At the next step the scheduler plans as usual. When every chunk of its plan is a row of
   the step launched ahead at the same position, and nothing the forward read has changed
   (the merged adapter, the modules' layout), that step is adopted: its tokens are already
   selected. Otherwise it is dropped and the plan runs as usual: the dropped step only
   wrote the keys and values of positions no other step has read yet, and every one of
   those that matters is written again by the step that recomputes it.

A row that finished at step 1 (EOS, a stop string, cancellation, a deadline) had one
position computed for nothing; its token is never read. Greedy tokens are the same as
without the step ahead: the same graph computes the same logits from the same inputs.
On the CPU, where every op completes before the next starts, the same code runs in
order (the tests exercise it through `RecordedCapture`); only on CUDA does it overlap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from flora_server.engine.paged.scheduler import ScheduledChunk, SequenceState
    from flora_server.engine.requests import RowState


def pipelines(row: RowState) -> bool:
    """Whether a row's next token is the argmax of its logits and nothing else: greedy, no
    grammar or allowed_token_ids, no repetition penalty (which reads the row's tokens on the
    host), no logprobs to report, no end still held back by `min_tokens` (for this step's
    token or the next). A sampling row is left out because a step dropped after it ran
    would have advanced the row's generator, and a seeded request must not depend on its
    batch."""
    params = row.request.params
    return (
        not params.do_sample
        and len(row.generated) >= params.min_tokens
        and params.repetition_penalty == 1.0
        and not params.logprobs
        and not params.top_logprobs
        and not params.allowed_token_ids
        and row.request.constraint is None
    )


class DeviceTokens:
    """The tokens a decode step selected, on the device, and their copy to the host,
    started when selected and waited for only when read (`host`). `device` [n] int64 is
    always a valid token id (the next step's embedding reads it: an id out of range
    would be a device-side error that ends the process); the host's copy marks a row
    whose logits were not finite with -1 instead."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.device = logits.argmax(dim=-1)  # [n] int64, in [0, V)
        marked = torch.where(torch.isfinite(logits).all(dim=-1), self.device, -1)
        self._event: torch.cuda.Event | None = None
        if marked.is_cuda:
            self._host = torch.empty(marked.shape, dtype=torch.long, pin_memory=True)
            self._host.copy_(marked, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(marked.device))
        else:
            self._host = marked

    def host(self) -> list[int]:
        """Each row's token, -1 where the row's logits were not finite."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


@dataclass(frozen=True)
class Ahead:
    """A decode step launched before the host read the tokens of the step it follows."""

    seqs: tuple[SequenceState, ...]
    starts: tuple[int, ...]  # the position each row's input token takes
    tokens: DeviceTokens
    state: tuple[object, ...]  # what the forward read that may change (`Stepper` decides)

    def order_for(
        self, chunks: Sequence[ScheduledChunk], state: tuple[object, ...]
    ) -> list[int] | None:
        """For each chunk of a plan, the index of its row in this step, or None when this
        step does not compute the plan (a chunk that is not one of its rows at the same
        position, or `state` changed)."""
        if state != self.state:
            return None
        rows = zip(self.seqs, self.starts, strict=True)
        index = {id(seq): (i, start) for i, (seq, start) in enumerate(rows)}
        order = []
        for chunk in chunks:
            hit = index.get(id(chunk.seq))
            if hit is None or chunk.count != 1 or hit[1] != chunk.start:
                return None
            order.append(hit[0])
        return order
