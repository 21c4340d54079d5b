"""A fused per-row low-rank kernel for float32 CPU serving (BGMV-style), via numba.

Why: on a CPU a decode step is about 200 small matmuls, and the torch formulations of a
mixed-adapter update all pay for something the maths does not need. "wide" multiplies
every row by every distinct adapter's columns (K times the rank-``r`` work), "rows" reads
a per-row copy of the factors, and grouping rows by adapter turns each projection into
``2 K`` tiny BLAS calls at several microseconds each. This kernel does what a GPU
BGMV kernel does: one call per group of sibling projections (q/k/v, gate/up) or per
projection, each row reads its own slot's factors in place (``A`` stored transposed,
``(S, R, n_in)``) and does exactly its rank's work; rows run in parallel.
``bench/kernels.py`` measures it against the torch paths.

``kernel_for()`` / ``row_kernel()`` are the capability check: ``None`` where the kernel
does not apply or would not pay (the torch paths then serve every routing, and they stay
the reference the kernel is tested against). ``NumbaBackend`` serves a module through it:
``_KernelPlan`` per routing, one kernel call per sibling group (``_RowDeltas``) for
decode-sized inputs, per-row BLAS (``_PrefillShrink``) for prefill-sized ones; a segment
routing through ``numba_segments.SegmentKernelPlan`` (the kernel's segment entry point,
``RowKernel.segments``).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch

from flora.serving.backends.base import Backend, PerInput, RowTarget
from flora.serving.backends.numba_segments import SegmentKernelPlan, share_segments
from flora.serving.backends.torch_paths import torch_plan, torch_segment_plan
from flora.serving.base import Plan, ServingPolicy
from flora.serving.segments import Segments

__all__ = ["NumbaBackend", "RowKernel", "kernel_for", "row_kernel"]


class RowKernel:
    """``kernel(x, row_slots, ats, bs, ranks, ds)``: for each member ``j`` (up to 3
    projections reading the same input), ``d_j[n] = (x[n] @ A_j[s]) @ B_j[s]``.

    ``x: [N, n_in]`` is a contiguous float32 CPU tensor whose ``N`` rows are ``B`` batch
    rows of ``N / B`` tokens each (decode: one token); ``row_slots: [B]`` int32 (-1: no
    adapter, ``d`` row zero); per member, ``at: [S, R, n_in]``, ``b: [S, R, n_out]``
    (float32, or bfloat16 bits as int16) and ``ranks: [S]`` (int32) are numpy views of a
    rank-major
    ``DeviceSlotBank``, read in place, and ``d: [N, n_out]`` is a contiguous float32
    tensor the kernel overwrites. The caller then adds the base in one GEMM
    (``d.addmm_(x, W^T)``), so ``y`` is written once.

    Calls are serialised by a lock: two engines in one process (each running forwards on
    its own worker thread) would otherwise each start a team of threads on the same cores.
    """

    def __init__(
        self,
        fn: Callable[..., None],
        set_threads: Callable[[int], object],
        segment_fn: Callable[..., None],
    ) -> None:
        self._fn = fn
        self._segment_fn = segment_fn
        self._set_threads = set_threads
        self._lock = threading.Lock()
        self._local = threading.local()  # numba's thread count is per calling thread

    def _follow_torch_threads(self) -> None:
        threads = torch.get_num_threads()  # follow torch's intra-op setting
        if getattr(self._local, "threads", None) != threads:
            self._set_threads(threads)
            self._local.threads = threads

    def __call__(
        self,
        x: torch.Tensor,
        row_slots: np.ndarray,
        ats: tuple[np.ndarray, ...],
        bs: tuple[np.ndarray, ...],
        ranks: tuple[np.ndarray, ...],
        ds: tuple[torch.Tensor, ...],
    ) -> None:
        self._follow_torch_threads()
        tokens = x.shape[0] // row_slots.shape[0]
        outs = tuple(d.numpy() for d in ds)
        with self._lock:
            self._fn(x.numpy(), row_slots, tokens, ats, bs, ranks, outs)

    def segments(
        self,
        x: torch.Tensor,
        items: np.ndarray,
        ats: tuple[np.ndarray, ...],
        bs: tuple[np.ndarray, ...],
        ranks: tuple[np.ndarray, ...],
        ds: tuple[torch.Tensor, ...],
    ) -> None:
        """The segment form: ``items: [3, W]`` int32 (first token, end token, slot of each
        piece of a segment); ``d_j`` rows of the items' tokens are written, other rows are
        left as they are. Same ``x``, factors and ``d`` conventions as ``__call__``."""
        self._follow_torch_threads()
        outs = tuple(d.numpy() for d in ds)
        with self._lock:
            self._segment_fn(x.numpy(), items[0], items[1], items[2], ats, bs, ranks, outs)


@functools.cache
def row_kernel() -> RowKernel | None:
    """The compiled kernel, or ``None`` when it would not pay: numba missing or failing to
    compile here, or only numba's "workqueue" thread pool available (no OpenMP or TBB
    runtime: measured 10x slower per call than with OpenMP, see docs/performance.md).

    Compiled on first use (seconds) and cached on disk by numba, which loads it faster.
    """
    try:
        import numba

        from flora.serving.backends._row_kernel_numba import row_deltas, segment_deltas
    except Exception:  # ImportError, or numba failing to compile for this CPU
        return None
    # numba.config sets its options from the environment at import, out of its stubs' sight
    limit = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    kernel = RowKernel(
        row_deltas, lambda n: numba.set_num_threads(max(1, min(n, limit))), segment_deltas
    )
    unit = np.ones((1, 1, 1), dtype=np.float32)
    kernel(
        torch.ones(1, 1),
        np.zeros(1, np.int32),
        (unit,),
        (unit,),
        (np.ones(1, np.int32),),
        (torch.empty(1, 1),),
    )
    if numba.threading_layer() == "workqueue":
        return None
    return kernel


def kernel_for(enabled: bool, device: torch.device, dtype: torch.dtype) -> RowKernel | None:
    """The kernel for a module of ``dtype`` on ``device`` when the policy ``enabled`` it:
    float32 on the CPU only, and only where ``row_kernel()`` is available."""
    if enabled and device.type == "cpu" and dtype == torch.float32:
        return row_kernel()
    return None


def _numpy_bank(t: torch.Tensor) -> np.ndarray:
    """A bank tensor as the kernel reads it: float32 as is, bfloat16 as its int16 bits."""
    return (t if t.dtype == torch.float32 else t.view(torch.int16)).numpy()


class _RowDeltas:
    """The fused CPU kernel's per-row updates for up to 3 sibling projections that read the
    same input (q/k/v, gate/up; one member otherwise): ``d_j = per-row (x @ A_j) @ B_j``,
    all from one kernel call, handed out by ``PerInput``'s rule; so a llama layer makes 4
    kernel calls per step, not 7.
    """

    __slots__ = ("ats", "bs", "kernel", "n_outs", "per_input", "ranks", "slots")

    def __init__(self, kernel: RowKernel, slots: np.ndarray, members: list[_KernelPlan]) -> None:
        self.kernel, self.slots = kernel, slots  # slots: [B] int32, -1 = none
        self.ats = tuple(m.at for m in members)  # [S + 1, R, in] each
        self.bs = tuple(m.b for m in members)  # [S + 1, R, out_j] each
        self.ranks = tuple(m.ranks for m in members)  # [S + 1] int32 each
        self.n_outs = tuple(m.b.shape[2] for m in members)
        self.per_input = PerInput(len(members))

    def get(self, x: torch.Tensor, x2: torch.Tensor, member: int) -> torch.Tensor:
        """Member ``member``'s ``d: [N, out]`` for input ``x`` (``x2``: its contiguous
        ``[N, in]`` view)."""

        def compute() -> tuple[torch.Tensor, ...]:
            ds = tuple(x2.new_empty(x2.shape[0], n) for n in self.n_outs)
            self.kernel(x2, self.slots, self.ats, self.bs, self.ranks, ds)
            return ds

        d: torch.Tensor = self.per_input.take(x, member, compute)[member]
        return d


class _PrefillShrink:
    """Prefill-sized inputs of the same sibling group: one shrink for all members,
    ``h^T = bmm([A_1 | A_2 | ...]_rows^T, x^T)`` (``[B, sum r_j, T]``), sliced by each member
    (``PerInput``'s rule). The per-row factors (each member's own slot per row, zero where
    its adapter does not target the member) are gathered on first use."""

    __slots__ = ("at_rows", "b_rows", "members", "offsets", "per_input")

    def __init__(self, members: list[_KernelPlan]) -> None:
        self.members = members
        self.at_rows: torch.Tensor | None = None  # [B, sum r_j, in]
        self.b_rows: list[torch.Tensor] = []  # [B, r_j, out_j] each
        self.offsets: list[tuple[int, int]] = []
        self.per_input = PerInput(len(members))

    def _gather(self, dtype: torch.dtype) -> torch.Tensor:
        ats, lo = [], 0
        for m in self.members:
            cap = int(m.ranks.max())
            ats.append(m.bank.at[:, :cap].index_select(0, m.index).to(dtype))
            self.b_rows.append(m.bank.b[:, :cap].index_select(0, m.index).to(dtype))
            self.offsets.append((lo, lo + cap))
            lo += cap
        self.at_rows = torch.cat(ats, dim=1)
        return self.at_rows

    def get(self, x: torch.Tensor, rows: int, member: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Member ``member``'s ``(h^T: [B, r, T], B_rows: [B, r, out])`` for input ``x``."""

        def compute() -> torch.Tensor:
            at_rows = self.at_rows if self.at_rows is not None else self._gather(x.dtype)
            x3 = x.reshape(rows, -1, x.shape[-1])  # [B, T, in]
            return torch.bmm(at_rows, x3.transpose(1, 2))  # [B, sum r_j, T]

        h: torch.Tensor = self.per_input.take(x, member, compute)
        lo, hi = self.offsets[member]
        return h[:, lo:hi], self.b_rows[member]


class _KernelPlan:
    """Per-row factors read where they are: no per-routing copies, no extra columns.

    Decode-sized inputs (fewer than ``blas_min_tokens`` tokens per row): the fused CPU
    kernel (through this plan's ``_RowDeltas``, maybe shared with siblings) writes every
    row's ``d = (x_row @ A_s) @ B_s`` with its own slot's factors read in place from the
    bank, then one GEMM adds the base into it: ``y = d + x W^T (+ bias)`` (``addmm_``, so
    ``y`` is written once).
    Prefill-sized inputs go to BLAS instead, where each row's tokens form a real matrix:
    ``h^T = bmm(A_rows^T, x^T)`` (``[B, R, T]``: the long token axis as the GEMM's wide
    side, not an 8-column skinny output; one for all siblings, ``_PrefillShrink``) and
    ``y += bmm(h, B_rows)``, with the factors gathered per row on first use.

    ``torch_plan`` builds the torch path ("wide"/"rows"), used instead when autograd is
    recording or the input is not float32 (built on first need).
    """

    blas_min_tokens = 16

    __slots__ = (
        "at",
        "b",
        "bank",
        "base",
        "bias",
        "deltas",
        "index",
        "member",
        "prefill",
        "ranks",
        "slots",
        "torch_path",
        "torch_plan",
        "weight_t",
    )

    def __init__(
        self,
        target: RowTarget,
        kernel: RowKernel,
        slots: np.ndarray,
        torch_plan: Callable[[], Plan],
    ) -> None:
        bank = target.bank
        self.base, self.bank = target.base_forward, bank
        self.weight_t = target.weight_t  # [in, out]
        self.bias = target.base_bias
        self.at, self.b = _numpy_bank(bank.at), _numpy_bank(bank.b)  # [S+1, R, in], [S+1, R, out]
        self.slots = slots  # [B] int32, -1 = none
        self.ranks = np.asarray([*target.slot_rank, 0], dtype=np.int32)  # [S + 1]
        self.deltas, self.member = _RowDeltas(kernel, slots, [self]), 0
        self.index = torch.tensor([bank.null_slot if s < 0 else int(s) for s in slots])
        self.prefill = _PrefillShrink([self])
        self.torch_plan = torch_plan
        self.torch_path: Plan | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != torch.float32:
            if self.torch_path is None:
                self.torch_path = self.torch_plan()
            return self.torch_path(x)
        rows = self.slots.shape[0]
        if x.numel() >= self.blas_min_tokens * rows * x.shape[-1]:
            return self._prefill(x, rows)
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [N, in]
        d = self.deltas.get(x, x2, self.member)  # [N, out]
        if self.bias is not None:
            d.add_(self.bias)
        d.addmm_(x2, self.weight_t)
        return d.view(*x.shape[:-1], d.shape[-1])

    def _prefill(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        y = self.base(x)  # [B, T, out]
        h_t, b = self.prefill.get(x, rows, self.member)  # [B, r, T], [B, r, out]
        y.view(rows, -1, y.shape[-1]).baddbmm_(h_t.transpose(1, 2), b)
        return y


class NumbaBackend(Backend):
    """float32 on the CPU, where numba's kernel is available (``kernel_for``). Reads the
    bank rank-major, and factors stored as ``policy.factor_dtype`` (bfloat16 bits widened
    as it reads)."""

    name = "numba"
    rank_major = True
    narrow_factors = True

    def __init__(self, kernel: RowKernel) -> None:
        self.kernel = kernel

    @classmethod
    def load(
        cls, policy: ServingPolicy, device: torch.device, dtype: torch.dtype
    ) -> NumbaBackend | None:
        kernel = kernel_for(policy.cpu_kernel, device, dtype)
        return None if kernel is None else cls(kernel)

    def build_plan(self, target: RowTarget, rows: list[int]) -> Plan:
        return _KernelPlan(
            target, self.kernel, np.asarray(rows, dtype=np.int32), lambda: torch_plan(target, rows)
        )

    def build_segment_plan(self, target: RowTarget, segments: Segments) -> Plan:
        return SegmentKernelPlan(
            target,
            self.kernel.segments,
            (_numpy_bank(target.bank.at), _numpy_bank(target.bank.b)),
            segments,
            lambda: torch_segment_plan(target, segments),
        )

    def share(self, plans: Sequence[Plan | None]) -> list[Plan | None]:
        """Up to 3 ``_KernelPlan`` siblings of one input width get one ``_RowDeltas`` (one
        kernel call per input for all of them) and one ``_PrefillShrink``; up to 3
        ``SegmentKernelPlan`` siblings one shared segment call (``share_segments``)."""
        present = sum(p is not None for p in plans)
        segment_plans = [p for p in plans if isinstance(p, SegmentKernelPlan)]
        if len(segment_plans) == present:
            share_segments(self.kernel.segments, segment_plans)
            return list(plans)
        live = [p for p in plans if isinstance(p, _KernelPlan)]
        if len(live) < 2 or len(live) != present:
            return list(plans)
        if len(live) <= 3 and len({p.at.shape[2] for p in live}) == 1:  # the kernel's limit
            # A row's slot, if any member is adapted by it (a member whose adapter does not
            # target it has rank 0 for that slot, so its d row stays zero).
            slots = np.maximum.reduce([p.slots for p in live])
            deltas = _RowDeltas(live[0].deltas.kernel, slots, live)
            prefill = _PrefillShrink(live)
            for member, p in enumerate(live):
                p.deltas, p.prefill, p.member = deltas, prefill, member
        return list(plans)
