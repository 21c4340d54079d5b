"""The numba CPU backend's segment form (SGMV): a packed forward's token segments, each
with its adapter, for float32 Linear/Conv1D on the CPU (``NumbaBackend.build_segment_plan``).

Short segments (decode tokens, short chunks) are cut into pieces of at most
``piece_tokens`` tokens and all go through one fused kernel call (``RowKernel.segments``)
that runs the pieces in parallel, reading each piece's factors in place from the bank,
once per piece. A long segment with an adapter (``blas_min_tokens`` or more) is a real
matrix: it takes two BLAS GEMMs with its slot's factors as they are in the bank (views, or
one widening copy per routing when stored as bfloat16), ``h^T = A_s^T x^T`` with the long
token axis as the GEMM's wide side, then ``d = h B_s``. The per-token row path instead runs
every prefill token through the fused kernel as a row of its own.

Sibling projections (q/k/v, gate/up) share one kernel call per input (``share_segments``),
as the row form does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from flora.serving.backends.base import PerInput, RowTarget
from flora.serving.base import NO_SLOT, Plan
from flora.serving.segments import Segments

__all__ = ["SegmentKernelPlan", "share_segments"]

SegmentRun = Callable[..., None]
"""``RowKernel.segments``: ``run(x, items, ats, bs, ranks, ds)``."""


class _SegmentDeltas:
    """``d_j`` for the tokens of one input for up to 3 sibling members: one fused kernel
    call for the short pieces, GEMMs for the long segments, handed out by ``PerInput``'s
    rule."""

    piece_tokens = 8  # tokens per work item: pieces spread a chunk over the threads
    blas_min_tokens = 16  # a segment this long with an adapter goes to BLAS

    __slots__ = ("ats", "bs", "items", "long", "n_outs", "per_input", "ranks", "run")

    def __init__(
        self, run: SegmentRun, segments: Segments, members: list[SegmentKernelPlan]
    ) -> None:
        self.run = run
        self.ats = tuple(m.at for m in members)  # [S + 1, R, in] each
        self.bs = tuple(m.b for m in members)  # [S + 1, R, out_j] each
        self.ranks = tuple(m.ranks for m in members)  # [S + 1] int32 each
        self.n_outs = tuple(m.b.shape[2] for m in members)
        pieces: list[tuple[int, int, int]] = []
        long: list[tuple[int, int, int]] = []
        for start, n, s in zip(segments.starts, segments.lengths, segments.slots, strict=True):
            if s != NO_SLOT and n >= self.blas_min_tokens:
                long.append((start, start + n, s))
            else:
                pieces.extend(
                    (lo, min(lo + self.piece_tokens, start + n), s)
                    for lo in range(start, start + n, self.piece_tokens)
                )
        self.items = np.ascontiguousarray(np.asarray(pieces, dtype=np.int32).reshape(-1, 3).T)
        # per member, per long segment: (first token, end token, A_s^T [r, in], B_s [r, out])
        # as float32 tensors, or None where the member's rank for the slot is 0
        self.long = [[(lo, hi, *m.long_factors(s)) for lo, hi, s in long] for m in members]
        self.per_input = PerInput(len(members))

    def get(self, x: torch.Tensor, x2: torch.Tensor, member: int) -> torch.Tensor:
        """Member ``member``'s ``d: [N, out]`` for input ``x`` (``x2``: its contiguous
        ``[N, in]`` view)."""

        def compute() -> tuple[torch.Tensor, ...]:
            ds = tuple(x2.new_empty(x2.shape[0], n) for n in self.n_outs)
            if self.items.shape[1]:
                self.run(x2, self.items, self.ats, self.bs, self.ranks, ds)
            for d, work in zip(ds, self.long, strict=True):
                for lo, hi, at, b in work:
                    if at is None:
                        d[lo:hi].zero_()
                    else:  # h^T = A^T x^T: [r, L], then d = h B: [L, out]
                        torch.mm(torch.mm(at, x2[lo:hi].t()).t(), b, out=d[lo:hi])
            return ds

        d: torch.Tensor = self.per_input.take(x, member, compute)[member]
        return d


class SegmentKernelPlan:
    """``y = d + x W^T (+ bias)`` with every segment's ``d = (x_seg @ A_s) @ B_s`` from
    ``_SegmentDeltas`` (maybe shared with siblings); one GEMM adds the base into ``d``
    (``addmm_``), so ``y`` is written once. ``torch_plan`` builds the torch path, used when
    autograd is recording or the input is not float32 (built on first need)."""

    __slots__ = (
        "at",
        "b",
        "bank",
        "bias",
        "deltas",
        "member",
        "ranks",
        "run",
        "segments",
        "torch_path",
        "torch_plan",
        "weight_t",
    )

    def __init__(
        self,
        target: RowTarget,
        run: SegmentRun,
        banks: tuple[np.ndarray, np.ndarray],
        segments: Segments,
        torch_plan: Callable[[], Plan],
    ) -> None:
        self.bank = target.bank
        self.weight_t = target.weight_t  # [in, out]
        self.bias = target.base_bias
        self.at, self.b = banks  # numpy views of the bank: [S+1, R, in], [S+1, R, out]
        self.ranks = np.asarray([*target.slot_rank, 0], dtype=np.int32)  # [S + 1]
        self.run, self.segments = run, segments
        # built on first use unless share_segments gives the plan a shared one first
        self.deltas: _SegmentDeltas | None = None
        self.member = 0
        self.torch_plan = torch_plan
        self.torch_path: Plan | None = None

    def long_factors(self, slot: int) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """``(A_s^T [r, in], B_s [r, out])`` of ``slot`` as float32 (views of a float32
        bank), or ``(None, None)`` where this module's rank for it is 0."""
        r = int(self.ranks[slot])
        if r == 0:
            return None, None
        return self.bank.at[slot, :r].float(), self.bank.b[slot, :r].float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != torch.float32:
            if self.torch_path is None:
                self.torch_path = self.torch_plan()
            return self.torch_path(x)
        if self.deltas is None:
            self.deltas = _SegmentDeltas(self.run, self.segments, [self])
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [N, in]
        d = self.deltas.get(x, x2, self.member)  # [N, out]
        if self.bias is not None:
            d.add_(self.bias)
        d.addmm_(x2, self.weight_t)
        return d.view(*x.shape[:-1], d.shape[-1])


def share_segments(run: SegmentRun, plans: Sequence[SegmentKernelPlan]) -> None:
    """Up to 3 sibling segment plans of one input width get one ``_SegmentDeltas`` (one
    kernel call per input for all of them); others keep their own."""
    if not 2 <= len(plans) <= 3 or len({p.at.shape[2] for p in plans}) != 1:
        return
    # A segment's slot, if any member is adapted by it (a member whose adapter does not
    # target it has rank 0 for that slot, so its rows of d stay zero).
    first = plans[0].segments
    slots = np.maximum.reduce([np.asarray(p.segments.slots) for p in plans])
    shared = first.with_slots([int(s) for s in slots])
    deltas = _SegmentDeltas(run, shared, list(plans))
    for member, p in enumerate(plans):
        p.deltas, p.member = deltas, member
