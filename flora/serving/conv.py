"""Served ConvNd (groups and depthwise included): rows grouped by adapter, merged weights.

A conv's update ``dW = s G x_1 U_out x_2 U_in x_3 U_k1 ...`` has the base weight's shape
``(out, in/groups, k_1..k_m)``, so running a row with ``W + dW_k`` is exactly the base conv
plus the update with the group structure kept. Two kernels, picked per routing by
``ServingPolicy`` (measured in bench/kernels.py):

- segments: rows sorted by adapter; each group runs once with its merged weight. Total
  FLOPs equal the base conv's; ``K`` conv calls plus one gather/scatter per group.
- rows: one grouped conv over the whole batch folded into channels,
  ``x: (1, B*C, ...)``, weight ``(B*out, in/groups, ...)``, ``groups = B * groups``: one call
  whatever the mix, but a ``B``-fold weight stack built per routing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flora.serving.base import NO_SLOT, Plan, RoutingState, ServedModule, ServingPolicy
from flora.serving.factors import ModuleFactors, check_weight_shape, tucker_full

__all__ = ["ServedConv"]

_CONV_FN: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _SegmentsPlan:
    """``out[idx_k] = conv(x[idx_k], W + dW_k)`` for each row group ``k``."""

    __slots__ = ("conv", "segments")

    def __init__(
        self,
        conv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        segments: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        # segments: (row index [n_k], weight) per group; a single group takes every row
        self.conv, self.segments = conv, segments

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.segments) == 1:
            return self.conv(x, self.segments[0][1])
        (idx, w), *rest = self.segments
        part = self.conv(x.index_select(0, idx), w)
        out = part.new_empty((x.shape[0], *part.shape[1:]))
        out.index_copy_(0, idx, part)
        for idx, w in rest:
            out.index_copy_(0, idx, self.conv(x.index_select(0, idx), w))
        return out


class _RowsPlan:
    """One grouped conv: batch folded into channels, per-row merged weights stacked."""

    __slots__ = ("bias", "fn", "groups", "kwargs", "weight")

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        groups: int,
        kwargs: Mapping[str, object],
    ) -> None:
        self.fn, self.weight, self.bias, self.groups, self.kwargs = (
            fn,
            weight,
            bias,
            groups,
            kwargs,
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        z = self.fn(
            x.reshape(1, -1, *x.shape[2:]),
            self.weight,
            self.bias,
            groups=self.groups,
            **self.kwargs,
        )
        return z.view(b, -1, *z.shape[2:])


class ServedConv(ServedModule):
    """Multi-adapter ``nn.Conv1d/2d/3d`` (kinds ``conv1d/2d/3d``), any ``groups``."""

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
        self.spatial = self.weight.dim() - 2
        self.kind = f"conv{self.spatial}d"
        # Slots hold the (small) Tucker tensors; W + dW_k is built on the first routing
        # that needs slot k and kept until the slot or the base weight changes, so a
        # vision batch (one forward per routing) does not rebuild it every time.
        self.slot_factors: list[ModuleFactors | None] = [None] * max_slots
        self._merged_cache: dict[int, torch.Tensor] = {}

    def check(self, name: str, mf: ModuleFactors) -> None:
        if mf.kind != self.kind:
            raise ValueError(f"{name}: adapter kind {mf.kind!r}, base module is {self.kind}")
        check_weight_shape(name, mf, self.weight.shape)

    def write_slot(self, slot: int, mf: ModuleFactors) -> None:
        w = self.weight
        self.slot_factors[slot] = ModuleFactors(
            kind=mf.kind,
            core=mf.core.to(device=w.device, dtype=torch.float32, copy=True),
            factors=tuple(
                u.to(device=w.device, dtype=torch.float32, copy=True) for u in mf.factors
            ),
            scale=mf.scale,
        )
        self.slot_rank[slot] = max(mf.ranks)
        self._merged_cache.pop(slot, None)

    def clear_slot(self, slot: int) -> None:
        self.slot_factors[slot] = None
        self.slot_rank[slot] = 0
        self._merged_cache.pop(slot, None)

    def invalidate(self) -> None:
        self._merged_cache.clear()

    def delta_weight(self, slot: int) -> torch.Tensor:
        mf = self.slot_factors[slot]
        if mf is None:
            raise ValueError(f"slot {slot} does not target this module")
        return tucker_full(mf.core, mf.factors, mf.scale)

    def _merged(self, slot: int) -> torch.Tensor:
        w = self.weight
        if slot == NO_SLOT:
            return w.detach()
        merged = self._merged_cache.get(slot)
        if merged is None:
            merged = (w.detach().float() + self.delta_weight(slot)).to(w.dtype)
            self._merged_cache[slot] = merged
        return merged

    def _base_conv(self) -> nn.Conv1d | nn.Conv2d | nn.Conv3d:
        conv = self.base_layer
        if not isinstance(conv, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            raise TypeError(f"{type(conv).__name__} is not a Conv1d/2d/3d")
        return conv

    def build_plan(self, row_slots: Sequence[int]) -> Plan | None:
        rows = self.row_targets(row_slots)
        groups = sorted(set(rows))
        if groups == [NO_SLOT]:
            return None
        base = self._base_conv()
        weights = {s: self._merged(s) for s in groups}
        numel = len(rows) * self.weight.numel()
        use_rows = (
            len(groups) > self.policy.conv_segments_max
            and base.padding_mode == "zeros"
            and numel <= self.policy.conv_rows_max_numel
        )
        if not use_rows:
            device = self.weight.device
            segments = [
                (torch.tensor([i for i, s in enumerate(rows) if s == g], device=device), weights[g])
                for g in groups
            ]
            return _SegmentsPlan(lambda x, w: base._conv_forward(x, w, base.bias), segments)
        stack = torch.stack([weights[s] for s in rows])  # [B, out, in/g, *k]
        bias = None if base.bias is None else base.bias.detach().repeat(len(rows))
        kwargs = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
        return _RowsPlan(
            _CONV_FN[self.spatial], stack.flatten(0, 1), bias, base.groups * len(rows), kwargs
        )
