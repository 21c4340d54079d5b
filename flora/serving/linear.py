"""Served Linear and transformers Conv1D: ``y = base(x) + (x @ A_slot) @ B_slot`` per row."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flora.kinds import is_hf_conv1d
from flora.serving.bank import DeviceSlotBank
from flora.serving.base import NO_SLOT, Plan, RoutingState, ServingPolicy
from flora.serving.cpu_kernel import RowKernel, kernel_for
from flora.serving.gpu_kernel import TritonRowKernel, block_rank, gpu_kernel_for
from flora.serving.two_mode import ServedTwoMode

__all__ = ["ServedLinear", "share_shrinks"]


class _PerInput:
    """A value computed from one input for a group of sibling members (q/k/v, gate/up) and
    handed to each member once: the first member to run on an input computes it; it is
    reused only for the same tensor object, and by each member once, so when every member
    took it (or a member comes back with the same tensor) it is computed afresh and a later
    pass that refills the same input buffer is not served an old value. Assumed: the input
    is not modified in place between the sibling calls of one pass (true of llama-style
    blocks, which feed one normalised hidden state to q, k and v, and to gate and up)."""

    __slots__ = ("members", "pending", "value", "x")

    def __init__(self, members: int) -> None:
        self.members = members
        self.x: torch.Tensor | None = None
        self.value: Any = None
        self.pending: set[int] = set()

    def take(self, x: torch.Tensor, member: int, compute: Callable[[], Any]) -> Any:
        if self.x is not x or member not in self.pending:
            self.x, self.value, self.pending = x, compute(), set(range(self.members))
        self.pending.discard(member)
        value = self.value
        if not self.pending:  # every member served: drop the references
            self.x = self.value = None
        return value


class _WidePlan:
    """All distinct adapters side by side: ``y += ((x @ A_cat) * mask) @ B_cat``.

    ``A_cat: (in, W)``, ``B_cat: (W, out)``, ``W = sum r_k``; ``mask: (B, 1, W)`` keeps, for
    each row, only its adapter's columns (``None`` when every row uses the same one).
    Three ops whatever the mix, and each distinct adapter is read once per step.
    """

    __slots__ = ("a", "b", "base", "mask")

    def __init__(self, base, a, b, mask) -> None:  # type: ignore[no-untyped-def]
        self.base, self.a, self.b, self.mask = base, a, b, mask

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [B, T, out]
        h = torch.mm(x.reshape(-1, x.shape[-1]), self.a)  # [B*T, W]
        if self.mask is not None:
            h.view(self.mask.shape[0], -1, h.shape[-1]).mul_(self.mask)
        y.view(-1, y.shape[-1]).addmm_(h, self.b)
        return y


class _RowsPlan:
    """Per-row factors gathered once per routing: ``y += bmm(bmm(x, A_rows), B_rows)``.

    ``A_rows: (B, in, r)``, ``B_rows: (B, r, out)``, ``r = max r_k`` (zero-padded; rows
    without an adapter hold zeros).
    """

    __slots__ = ("a", "b", "base")

    def __init__(self, base, a, b) -> None:  # type: ignore[no-untyped-def]
        self.base, self.a, self.b = base, a, b

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if x.dim() == 3:  # the usual [B, T, in]: no reshapes (each costs a dispatch)
            return y.baddbmm_(torch.bmm(x, self.a), self.b)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        y.view(y.shape[0], -1, y.shape[-1]).baddbmm_(torch.bmm(x3, self.a), self.b)
        return y


def _numpy_bank(t: torch.Tensor) -> np.ndarray:
    """A bank tensor as the kernel reads it: float32 as is, bfloat16 as its int16 bits."""
    return (t if t.dtype == torch.float32 else t.view(torch.int16)).numpy()


class _RowDeltas:
    """The fused CPU kernel's per-row updates for up to 3 sibling projections that read the
    same input (q/k/v, gate/up; one member otherwise): ``d_j = per-row (x @ A_j) @ B_j``,
    all from one kernel call, handed out by ``_PerInput``'s rule; so a llama layer makes 4
    kernel calls per step, not 7.
    """

    __slots__ = ("ats", "bs", "kernel", "n_outs", "per_input", "ranks", "slots")

    def __init__(self, kernel: RowKernel, slots: np.ndarray, members: list[_KernelPlan]) -> None:
        self.kernel, self.slots = kernel, slots  # slots: [B] int32, -1 = none
        self.ats = tuple(m.at for m in members)  # [S + 1, R, in] each
        self.bs = tuple(m.b for m in members)  # [S + 1, R, out_j] each
        self.ranks = tuple(m.ranks for m in members)  # [S + 1] int32 each
        self.n_outs = tuple(m.b.shape[2] for m in members)
        self.per_input = _PerInput(len(members))

    def get(self, x: torch.Tensor, x2: torch.Tensor, member: int) -> torch.Tensor:
        """Member ``member``'s ``d: [N, out]`` for input ``x`` (``x2``: its contiguous
        ``[N, in]`` view)."""

        def compute() -> tuple[torch.Tensor, ...]:
            ds = tuple(x2.new_empty(x2.shape[0], n) for n in self.n_outs)
            self.kernel(x2, self.slots, self.ats, self.bs, self.ranks, ds)
            return ds

        return self.per_input.take(x, member, compute)[member]


class _PrefillShrink:
    """Prefill-sized inputs of the same sibling group: one shrink for all members,
    ``h^T = bmm([A_1 | A_2 | ...]_rows^T, x^T)`` (``[B, sum r_j, T]``), sliced by each member
    (``_PerInput``'s rule). The per-row factors (each member's own slot per row, zero where
    its adapter does not target the member) are gathered on first use."""

    __slots__ = ("at_rows", "b_rows", "members", "offsets", "per_input")

    def __init__(self, members: list[_KernelPlan]) -> None:
        self.members = members
        self.at_rows: torch.Tensor | None = None  # [B, sum r_j, in]
        self.b_rows: list[torch.Tensor] = []  # [B, r_j, out_j] each
        self.offsets: list[tuple[int, int]] = []
        self.per_input = _PerInput(len(members))

    def _gather(self, dtype: torch.dtype) -> None:
        ats, lo = [], 0
        for m in self.members:
            cap = int(m.ranks.max())
            ats.append(m.bank.at[:, :cap].index_select(0, m.index).to(dtype))
            self.b_rows.append(m.bank.b[:, :cap].index_select(0, m.index).to(dtype))
            self.offsets.append((lo, lo + cap))
            lo += cap
        self.at_rows = torch.cat(ats, dim=1)

    def get(self, x: torch.Tensor, rows: int, member: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Member ``member``'s ``(h^T: [B, r, T], B_rows: [B, r, out])`` for input ``x``."""

        def compute() -> torch.Tensor:
            if self.at_rows is None:
                self._gather(x.dtype)
            x3 = x.reshape(rows, -1, x.shape[-1])  # [B, T, in]
            return torch.bmm(self.at_rows, x3.transpose(1, 2))  # [B, sum r_j, T]

        h = self.per_input.take(x, member, compute)
        lo, hi = self.offsets[member]
        return h[:, lo:hi], self.b_rows[member]


class _KernelPlan:
    """Per-row factors read where they are: no per-routing copies, no extra columns.

    Decode-sized inputs (fewer than ``blas_min_tokens`` tokens per row): the fused CPU
    kernel (``flora.serving.cpu_kernel``, through this plan's ``_RowDeltas``, maybe shared
    with siblings) writes every row's ``d = (x_row @ A_s) @ B_s`` with its own slot's
    factors read in place from the bank, then one GEMM adds the base into it:
    ``y = d + x W^T (+ bias)`` (``addmm_``, so ``y`` is written once).
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

    def __init__(self, served: ServedLinear, kernel, slots, torch_plan) -> None:  # type: ignore[no-untyped-def]
        bank = served.bank
        self.base, self.bank = served._base, bank
        w = served.weight
        self.weight_t = w if served.kind == "hf_conv1d" else w.t()  # [in, out]
        self.bias: torch.Tensor | None = served.base_layer.bias
        self.at, self.b = _numpy_bank(bank.at), _numpy_bank(bank.b)  # [S+1, R, in], [S+1, R, out]
        self.slots = slots  # [B] int32, -1 = none
        self.ranks = np.asarray([*served.slot_rank, 0], dtype=np.int32)  # [S + 1]
        self.deltas, self.member = _RowDeltas(kernel, slots, [self]), 0
        self.index = torch.tensor([bank.null_slot if s < 0 else int(s) for s in slots])
        self.prefill = _PrefillShrink([self])
        self.torch_plan: Callable[[], Plan] = torch_plan
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


class _TritonPlan:
    """CUDA: ``y = base(x)``, then the Triton kernel adds every row's ``(x @ A_s) @ B_s``
    in place, reading each row's slot from the bank up to its own rank
    (``flora.serving.gpu_kernel``). The routing (row slots, then every slot's rank here)
    goes to the device once, when the plan is built. ``torch_plan`` builds the torch path,
    used instead when autograd is recording.
    """

    __slots__ = (
        "a",
        "b",
        "base",
        "block_r",
        "kernel",
        "ranks",
        "slots",
        "torch_path",
        "torch_plan",
    )

    def __init__(self, served: ServedLinear, kernel, rows, torch_plan) -> None:  # type: ignore[no-untyped-def]
        bank = served.bank
        self.base, self.kernel, self.a, self.b = served._base, kernel, bank.a, bank.b
        ranks = [*served.slot_rank, 0]
        meta = torch.tensor([*rows, *ranks], dtype=torch.int32, device=bank.device)
        self.slots, self.ranks = meta[: len(rows)], meta[len(rows) :]
        self.block_r = block_rank(max(ranks[s] for s in rows if s != NO_SLOT))
        self.torch_plan: Callable[[], Plan] = torch_plan
        self.torch_path: Plan | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            if self.torch_path is None:
                self.torch_path = self.torch_plan()
            return self.torch_path(x)
        y = self.base(x)
        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        self.kernel(
            y.view(-1, y.shape[-1]), x2, self.slots, self.ranks, self.a, self.b, self.block_r
        )
        return y


class _SharedShrink:
    """One shrink for sibling projections that read the same input (q/k/v, gate/up).

    ``h = x @ [A_1 | A_2 | ...]`` (wide, then the concatenated row mask) or
    ``bmm(x, [A_1 | A_2 | ...])`` (rows) is computed by whichever member runs first on a
    given input and sliced by each member (``_PerInput``'s rule).
    """

    __slots__ = ("a", "mask", "per_input", "rows")

    def __init__(self, a: torch.Tensor, mask: torch.Tensor | None, rows: bool, n: int) -> None:
        self.a, self.mask, self.rows = a, mask, rows
        self.per_input = _PerInput(n)

    def get(self, x: torch.Tensor, member: int) -> torch.Tensor:
        def compute() -> torch.Tensor:
            if self.rows:
                return torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), self.a)
            h = torch.mm(x.reshape(-1, x.shape[-1]), self.a)
            if self.mask is not None:
                h.view(self.mask.shape[0], -1, h.shape[-1]).mul_(self.mask)
            return h

        return self.per_input.take(x, member, compute)


class _SharedPlan:
    """A member of a ``_SharedShrink``: ``y = base(x) + h[..., lo:hi] @ B`` (wide: one
    ``addmm_``; rows: one ``baddbmm_``)."""

    __slots__ = ("b", "base", "hi", "lo", "member", "shared")

    def __init__(self, base, shared, member, lo, hi, b) -> None:  # type: ignore[no-untyped-def]
        self.base, self.shared, self.b = base, shared, b
        self.member, self.lo, self.hi = member, lo, hi

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = self.shared.get(x, self.member)[..., self.lo : self.hi]
        if self.shared.rows:
            y.view(y.shape[0], -1, y.shape[-1]).baddbmm_(h, self.b)
        else:
            y.view(-1, y.shape[-1]).addmm_(h, self.b)
        return y


def share_shrinks(plans: Sequence[Plan | None]) -> list[Plan | None]:
    """Turn the plans of one group of sibling modules (same input width) into members of
    one shared computation: all ``_WidePlan`` or all ``_RowsPlan`` become ``_SharedPlan``
    members of one ``_SharedShrink`` (one concatenation per routing); up to 3
    ``_KernelPlan`` get one ``_RowDeltas`` (one kernel call per input for all of them).
    Other groups come back unchanged."""
    live = [p for p in plans if p is not None]
    if len(live) < 2:
        return list(plans)
    if all(isinstance(p, _KernelPlan) for p in live):
        if len(live) <= 3 and len({p.at.shape[2] for p in live}) == 1:  # the kernel's limit
            # A row's slot, if any member is adapted by it (a member whose adapter does not
            # target it has rank 0 for that slot, so its d row stays zero).
            slots = np.maximum.reduce([p.slots for p in live])
            deltas = _RowDeltas(live[0].deltas.kernel, slots, live)
            prefill = _PrefillShrink(live)
            for member, p in enumerate(live):
                p.deltas, p.prefill, p.member = deltas, prefill, member
        return list(plans)
    kinds = {type(p) for p in live}
    if len(kinds) != 1 or kinds.pop() not in (_WidePlan, _RowsPlan):
        return list(plans)
    rows = isinstance(live[0], _RowsPlan)
    a_dim = 2 if rows else 1
    if len({p.a.shape[a_dim - 1] for p in live}) != 1:
        return list(plans)
    mask = None
    masks = [p.mask for p in live] if not rows else []
    if any(m is not None for m in masks):
        n = next(m for m in masks if m is not None).shape[0]
        # a member without a mask applies to every row: ones over its columns
        mask = torch.cat(
            [
                m if m is not None else p.a.new_ones(n, 1, p.a.shape[1])
                for p, m in zip(live, masks, strict=True)
            ],
            dim=2,
        )
    a = torch.cat([p.a for p in live], dim=a_dim).contiguous()
    shared = _SharedShrink(a, mask, rows, len(live))
    out: list[Plan | None] = []
    lo, member = 0, 0
    for p in plans:
        if p is None:
            out.append(None)
            continue
        hi = lo + p.a.shape[a_dim]
        out.append(_SharedPlan(p.base, shared, member, lo, hi, p.b))
        lo, member = hi, member + 1
    return out


class ServedLinear(ServedTwoMode):
    """Multi-adapter ``nn.Linear`` (kind ``linear``) or transformers ``Conv1D`` (``hf_conv1d``).

    Each slot holds the folded update ``A = U_in``, ``B = s (U_out G)^T`` (see
    ``fold_two_mode``), so serving adds a rank-``r`` update per row: the fused CPU kernel
    (``_KernelPlan``) where ``kernel_for`` gives one, the Triton kernel (``_TritonPlan``)
    where ``gpu_kernel_for`` does, else two small matmuls ("wide" or "rows").
    """

    def __init__(
        self,
        base_layer: nn.Module,
        routing: RoutingState,
        index: int,
        max_slots: int,
        max_rank: int,
        policy: ServingPolicy,
    ) -> None:
        super().__init__(base_layer, routing, index, max_slots, max_rank, policy)
        w = base_layer.weight
        self.kind = "hf_conv1d" if is_hf_conv1d(base_layer) else "linear"
        n_in, n_out = (
            (w.shape[0], w.shape[1]) if self.kind == "hf_conv1d" else (w.shape[1], w.shape[0])
        )
        self.kernel: RowKernel | None = kernel_for(policy.cpu_kernel, w.device, w.dtype)
        self.gpu_kernel: TritonRowKernel | None = None
        if self.kernel is None:
            self.gpu_kernel = gpu_kernel_for(policy.gpu_kernel, w.device, w.dtype)
        factor_dtype = w.dtype
        if self.kernel is not None and policy.factor_dtype is not None:
            factor_dtype = policy.factor_dtype
        self.bank = DeviceSlotBank(
            n_in,
            n_out,
            max_slots,
            max_rank,
            w.device,
            factor_dtype,
            rank_major=self.kernel is not None,
        )
        if self.kind == "linear":
            weight, bias = w, base_layer.bias
            # F.linear directly: one module call less per projection per step.
            self._base = lambda x: F.linear(x, weight, bias)
        else:
            self._base = base_layer

    def delta_weight(self, slot: int) -> torch.Tensor:
        ab = self.slot_product(slot)  # (in, out)
        return ab if self.kind == "hf_conv1d" else ab.t()

    def merge_into_weight(self, slot: int) -> None:
        """float32: one ``addmm_`` into the weight (``W += B^T A^T`` for Linear's
        ``(out, in)``, ``W += A B`` for Conv1D's ``(in, out)``), no ``dW`` temporary and
        no float copy of ``W``; other dtypes round ``W + dW`` once, in float32."""
        w = self.weight
        if w.dtype != torch.float32:
            super().merge_into_weight(slot)
            return
        r = self.slot_rank[slot]
        a, b = self.bank.a[slot, :, :r].float(), self.bank.b[slot, :r].float()
        if self.kind == "hf_conv1d":
            w.addmm_(a, b)
        else:
            w.addmm_(b.t(), a.t())

    def build_plan(self, row_slots: Sequence[int]) -> Plan | None:
        rows = self.row_targets(row_slots)
        if all(s == NO_SLOT for s in rows):
            return None
        if self.gpu_kernel is not None:
            return _TritonPlan(self, self.gpu_kernel, rows, lambda: self._torch_plan(rows))
        if self.kernel is None:
            return self._torch_plan(rows)
        return _KernelPlan(
            self, self.kernel, np.asarray(rows, dtype=np.int32), lambda: self._torch_plan(rows)
        )

    def _torch_plan(self, rows: list[int]) -> Plan:
        """The torch kernels ("wide" or "rows", see ``ServingPolicy``) for per-row slots."""
        distinct = sorted({s for s in rows if s != NO_SLOT})
        ranks = [self.slot_rank[s] for s in distinct]
        homogeneous = all(s == distinct[0] for s in rows)
        dtype = self.weight.dtype  # the bank may store factors narrower (factor_dtype)
        if homogeneous or sum(ranks) <= self.policy.wide_max_rank:
            a, b = (t.to(dtype) for t in self.bank.wide(distinct, ranks))
            mask = None
            if not homogeneous:
                offsets = dict(zip(distinct, _cumsum(ranks), strict=True))
                mask = torch.zeros(len(rows), 1, a.shape[1], device=a.device, dtype=a.dtype)
                for i, s in enumerate(rows):
                    if s != NO_SLOT:
                        mask[i, 0, offsets[s] : offsets[s] + self.slot_rank[s]] = 1
            return _WidePlan(self._base, a, b, mask)
        index = [self.bank.null_slot if s == NO_SLOT else s for s in rows]
        a, b = self.bank.rows(torch.tensor(index, device=self.bank.device), max(ranks))
        return _RowsPlan(self._base, a.to(dtype), b.to(dtype))


def _cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        out.append(total)
        total += v
    return out
