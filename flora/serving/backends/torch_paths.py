"""The torch backend: two small matmuls per projection, "wide" or "rows" (see
``ServingPolicy``), and per adapter for token segments (``torch_segment_plan``). It serves
every device and dtype and runs under autograd, so it is the fallback of the fused kernels
and the reference they are tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flora.serving.backends.base import Backend, PerInput, RowTarget
from flora.serving.base import NO_SLOT, Plan, ServingPolicy
from flora.serving.segments import Segments, slot_groups

__all__ = ["TorchBackend", "torch_plan", "torch_segment_plan"]


class _WidePlan:
    """All distinct adapters side by side: ``y += ((x @ A_cat) * mask) @ B_cat``.

    ``A_cat: (in, W)``, ``B_cat: (W, out)``, ``W = sum r_k``; ``mask: (B, 1, W)`` keeps, for
    each row, only its adapter's columns (``None`` when every row uses the same one).
    Three ops whatever the mix, and each distinct adapter is read once per step.
    """

    __slots__ = ("a", "b", "base", "mask")

    def __init__(
        self, base: Plan, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None
    ) -> None:
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

    def __init__(self, base: Plan, a: torch.Tensor, b: torch.Tensor) -> None:
        self.base, self.a, self.b = base, a, b

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if x.dim() == 3:  # the usual [B, T, in]: no reshapes (each costs a dispatch)
            return y.baddbmm_(torch.bmm(x, self.a), self.b)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        y.view(y.shape[0], -1, y.shape[-1]).baddbmm_(torch.bmm(x3, self.a), self.b)
        return y


class _SharedShrink:
    """One shrink for sibling projections that read the same input (q/k/v, gate/up).

    ``h = x @ [A_1 | A_2 | ...]`` (wide, then the concatenated row mask) or
    ``bmm(x, [A_1 | A_2 | ...])`` (rows) is computed by whichever member runs first on a
    given input and sliced by each member (``PerInput``'s rule).
    """

    __slots__ = ("a", "mask", "per_input", "rows")

    def __init__(self, a: torch.Tensor, mask: torch.Tensor | None, rows: bool, n: int) -> None:
        self.a, self.mask, self.rows = a, mask, rows
        self.per_input = PerInput(n)

    def get(self, x: torch.Tensor, member: int) -> torch.Tensor:
        def compute() -> torch.Tensor:
            if self.rows:
                return torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), self.a)
            h = torch.mm(x.reshape(-1, x.shape[-1]), self.a)
            if self.mask is not None:
                h.view(self.mask.shape[0], -1, h.shape[-1]).mul_(self.mask)
            return h

        h: torch.Tensor = self.per_input.take(x, member, compute)
        return h


class _SharedPlan:
    """A member of a ``_SharedShrink``: ``y = base(x) + h[..., lo:hi] @ B`` (wide: one
    ``addmm_``; rows: one ``baddbmm_``)."""

    __slots__ = ("b", "base", "hi", "lo", "member", "shared")

    def __init__(
        self, base: Plan, shared: _SharedShrink, member: int, lo: int, hi: int, b: torch.Tensor
    ) -> None:
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


def torch_plan(target: RowTarget, rows: list[int]) -> Plan:
    """The torch kernels ("wide" or "rows", see ``ServingPolicy``) for per-row slots."""
    distinct = sorted({s for s in rows if s != NO_SLOT})
    ranks = [target.slot_rank[s] for s in distinct]
    homogeneous = all(s == distinct[0] for s in rows)
    dtype = target.weight.dtype  # the bank may store factors narrower (factor_dtype)
    bank = target.bank
    if homogeneous or sum(ranks) <= target.policy.wide_max_rank:
        a, b = (t.to(dtype) for t in bank.wide(distinct, ranks))
        mask = None
        if not homogeneous:
            offsets = dict(zip(distinct, _cumsum(ranks), strict=True))
            mask = torch.zeros(len(rows), 1, a.shape[1], device=a.device, dtype=a.dtype)
            for i, s in enumerate(rows):
                if s != NO_SLOT:
                    mask[i, 0, offsets[s] : offsets[s] + target.slot_rank[s]] = 1
        return _WidePlan(target.base_forward, a, b, mask)
    index = [bank.null_slot if s == NO_SLOT else s for s in rows]
    a, b = bank.rows(torch.tensor(index, device=bank.device), max(ranks))
    return _RowsPlan(target.base_forward, a.to(dtype), b.to(dtype))


class _SegmentGroupsPlan:
    """Token segments grouped by adapter: for each distinct slot ``k``, its tokens ``idx_k``
    (every segment that uses it) get ``y[idx_k] += (x[idx_k] @ A_k) @ B_k``; a slot used
    by one segment reads and writes that range in place (slices, no index copies).

    Each adapter's factors are read once per step and every token does only its own
    adapter's rank of work: what ``segment_delta`` defines, with same-slot segments
    merged into one matmul pair. Two matmuls and at most three copies per distinct adapter.
    """

    __slots__ = ("base", "groups")

    def __init__(
        self,
        base: Plan,
        groups: list[tuple[slice | torch.Tensor, torch.Tensor, torch.Tensor]],
    ) -> None:
        self.base = base
        self.groups = groups  # (token slice or index [n_k], A_k [in, r_k], B_k [r_k, out])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        x2 = x.reshape(-1, x.shape[-1])  # [N, in]
        y2 = y.view(-1, y.shape[-1])  # [N, out]
        for where, a, b in self.groups:
            if isinstance(where, slice):
                y2[where].addmm_(torch.mm(x2[where], a), b)
            else:
                y2.index_add_(0, where, torch.mm(torch.mm(x2.index_select(0, where), a), b))
        return y


def torch_segment_plan(target: RowTarget, segments: Segments) -> Plan:
    """The torch form of a segment routing (``_SegmentGroupsPlan``)."""
    bank, dtype = target.bank, target.weight.dtype
    groups = []
    for s, where in slot_groups(segments, bank.device):
        r = target.slot_rank[s]
        groups.append((where, bank.a[s, :, :r].to(dtype), bank.b[s, :r].to(dtype)))
    return _SegmentGroupsPlan(target.base_forward, groups)


def _cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        out.append(total)
        total += v
    return out


def share_wide_or_rows(plans: Sequence[Plan | None]) -> list[Plan | None]:
    """All ``_WidePlan`` or all ``_RowsPlan`` of one sibling group become ``_SharedPlan``
    members of one ``_SharedShrink`` (one concatenation per routing); other groups come
    back unchanged."""
    live = [p for p in plans if p is not None]
    if len(live) < 2:
        return list(plans)
    if all(isinstance(p, _RowsPlan) for p in live):
        rows = True
    elif all(isinstance(p, _WidePlan) for p in live):
        rows = False
    else:
        return list(plans)
    members: list[_WidePlan | _RowsPlan] = [p for p in live if isinstance(p, _WidePlan | _RowsPlan)]
    a_dim = 2 if rows else 1
    if len({p.a.shape[a_dim - 1] for p in members}) != 1:
        return list(plans)
    mask = None
    masks = [p.mask for p in members if isinstance(p, _WidePlan)]
    if any(m is not None for m in masks):
        n = next(m for m in masks if m is not None).shape[0]
        # a member without a mask applies to every row: ones over its columns
        mask = torch.cat(
            [
                m if m is not None else p.a.new_ones(n, 1, p.a.shape[1])
                for p, m in zip(members, masks, strict=True)
            ],
            dim=2,
        )
    a = torch.cat([p.a for p in members], dim=a_dim).contiguous()
    shared = _SharedShrink(a, mask, rows, len(members))
    out: list[Plan | None] = []
    lo, member = 0, 0
    for p in plans:
        if not isinstance(p, _WidePlan | _RowsPlan):
            out.append(None)
            continue
        hi = lo + p.a.shape[a_dim]
        out.append(_SharedPlan(p.base, shared, member, lo, hi, p.b))
        lo, member = hi, member + 1
    return out


class TorchBackend(Backend):
    """Every device and dtype: the torch paths, sharing one shrink between siblings."""

    name = "torch"

    @classmethod
    def load(cls, policy: ServingPolicy, device: torch.device, dtype: torch.dtype) -> Backend:
        return cls()

    def build_plan(self, target: RowTarget, rows: list[int]) -> Plan:
        return torch_plan(target, rows)

    def build_segment_plan(self, target: RowTarget, segments: Segments) -> Plan:
        return torch_segment_plan(target, segments)

    def share(self, plans: Sequence[Plan | None]) -> list[Plan | None]:
        return share_wide_or_rows(plans)
