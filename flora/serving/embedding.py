"""Served Embedding: ``y = base(ids) + U_num[slot][ids] @ (s G U_dim^T)`` per row or per
token segment."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flora.serving.bank import DeviceSlotBank
from flora.serving.base import NO_SLOT, Plan, RoutingState, ServingPolicy
from flora.serving.segments import Segments, slot_groups
from flora.serving.two_mode import ServedTwoMode

__all__ = ["ServedEmbedding"]


class _EmbeddingRowsPlan:
    """``y += bmm(U_flat[ids + offset_row], B_rows)``.

    The bank's ``A: (S + 1, num, R)`` is viewed as one table ``(S + 1) * num`` rows long;
    ``offset_row = slot_row * num`` picks each row's slot, so the lookup reads only the
    rows of the ids in the batch. ``B_rows: (B, R, dim)`` is gathered once per routing.
    """

    __slots__ = ("b", "base", "offset", "table")

    def __init__(
        self,
        base: Callable[[torch.Tensor], torch.Tensor],
        table: torch.Tensor,
        offset: torch.Tensor,
        b: torch.Tensor,
    ) -> None:
        self.base, self.table, self.offset, self.b = base, table, offset, b

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)  # [B, T, dim]
        u = F.embedding(ids.reshape(ids.shape[0], -1) + self.offset, self.table)  # [B, T, R]
        y.view(y.shape[0], -1, y.shape[-1]).baddbmm_(u, self.b)
        return y


class _EmbeddingSegmentsPlan:
    """Token segments: ``u = U_flat[ids + offset_token]`` (one lookup, each token's own
    slot: a gather per token is what an embedding does anyway, and it reads only the rows
    of the ids in the step), then per distinct adapter ``y[idx_k] += u[idx_k, :r_k] @ B_k``
    with its tokens grouped as ``slot_groups`` does (no per-token copy of ``B``)."""

    __slots__ = ("base", "groups", "offset", "table")

    def __init__(
        self,
        base: Callable[[torch.Tensor], torch.Tensor],
        table: torch.Tensor,
        offset: torch.Tensor,
        groups: list[tuple[slice | torch.Tensor, int, torch.Tensor]],
    ) -> None:
        self.base, self.table, self.offset, self.groups = base, table, offset, groups

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)  # [..., dim]
        u = F.embedding(ids.reshape(-1) + self.offset, self.table)  # [N, R]
        y2 = y.view(-1, y.shape[-1])  # [N, dim]
        for where, r, b in self.groups:
            if isinstance(where, slice):
                y2[where].addmm_(u[where, :r], b)
            else:
                y2.index_add_(0, where, u.index_select(0, where)[:, :r] @ b)
        return y


class ServedEmbedding(ServedTwoMode):
    """Multi-adapter ``nn.Embedding`` (kind ``embedding``, modes ``(num, dim)``).

    Slot update folded as for Linear with ids as one-hot inputs: ``A = U_num`` (or
    ``U_num G``), ``B = s G U_dim^T`` (or ``s U_dim^T``). The update applies to every id,
    ``padding_idx`` included, exactly as merging ``W + dW`` would.
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
        w = self.weight
        self.kind = "embedding"
        self.bank = DeviceSlotBank(w.shape[0], w.shape[1], max_slots, max_rank, w.device, w.dtype)

    def delta_weight(self, slot: int) -> torch.Tensor:
        return self.slot_product(slot)

    def build_plan(self, row_slots: Sequence[int]) -> Plan | None:
        rows = self.row_targets(row_slots)
        if all(s == NO_SLOT for s in rows):
            return None
        bank = self.bank
        index = torch.tensor(
            [bank.null_slot if s == NO_SLOT else s for s in rows], device=bank.device
        )
        table = bank.a.view(-1, bank.capacity)  # [(S + 1) * num, R]
        offset = (index * bank.n_in).unsqueeze(1)  # [B, 1]
        b = bank.b.index_select(0, index).contiguous()  # [B, R, dim]
        return _EmbeddingRowsPlan(self.base_layer, table, offset, b)

    def token_count(self, x: torch.Tensor) -> int:
        return x.numel()  # ids: one per token

    def build_segment_plan(self, segments: Segments) -> Plan | None:
        routed = segments.with_slots(self.row_targets(segments.slots))
        if not routed.live_slots():
            return None
        bank = self.bank
        token_slots = [bank.null_slot if s == NO_SLOT else s for s in routed.token_slots()]
        offset = torch.tensor(token_slots, device=bank.device) * bank.n_in  # [N]
        table = bank.a.view(-1, bank.capacity)  # [(S + 1) * num, R]
        groups = [
            (where, self.slot_rank[s], bank.b[s, : self.slot_rank[s]])
            for s, where in slot_groups(routed, bank.device)
        ]
        return _EmbeddingSegmentsPlan(self.base_layer, table, offset, groups)
