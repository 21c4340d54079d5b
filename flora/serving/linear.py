"""Served Linear and transformers Conv1D: ``y = base(x) + (x @ A_slot) @ B_slot`` per row
or per token segment."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flora.kinds import is_hf_conv1d
from flora.serving.backends import Backend, select
from flora.serving.bank import DeviceSlotBank
from flora.serving.base import NO_SLOT, Plan, RoutingState, ServingPolicy
from flora.serving.segments import Segments
from flora.serving.two_mode import ServedTwoMode

__all__ = ["ServedLinear"]


class ServedLinear(ServedTwoMode):
    """Multi-adapter ``nn.Linear`` (kind ``linear``) or transformers ``Conv1D`` (``hf_conv1d``).

    Each slot holds the folded update ``A = U_in``, ``B = s (U_out G)^T`` (see
    ``fold_two_mode``), so serving adds a rank-``r`` update per row, with the kernel
    backend ``flora.serving.backends.select`` picks for the weight's device and dtype
    (``self.backend``: the numba CPU kernel, the Triton kernel, or the torch paths).
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
        self.kind = "hf_conv1d" if is_hf_conv1d(base_layer) else "linear"
        n_in, n_out = (
            (w.shape[0], w.shape[1]) if self.kind == "hf_conv1d" else (w.shape[1], w.shape[0])
        )
        self.backend: Backend = select(policy, w.device, w.dtype)
        self.bank = DeviceSlotBank(
            n_in,
            n_out,
            max_slots,
            max_rank,
            w.device,
            self.backend.factor_dtype(policy, w.dtype),
            rank_major=self.backend.rank_major,
        )
        self.base_forward: Plan
        if self.kind == "linear":
            weight, bias = w, self.base_bias
            # F.linear directly: one module call less per projection per step.
            self.base_forward = lambda x: F.linear(x, weight, bias)
        else:
            # the module's __call__ (hooks included), kept as a plain callable so it is
            # not registered as a second child module
            self.base_forward = base_layer.__call__

    @property
    def weight_t(self) -> torch.Tensor:
        """The base weight as ``[in, out]`` (a view)."""
        w = self.weight
        return w if self.kind == "hf_conv1d" else w.t()

    @property
    def base_bias(self) -> torch.Tensor | None:
        bias = self.base_layer.bias
        return bias if isinstance(bias, torch.Tensor) else None

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
        return self.backend.build_plan(self, rows)

    def build_segment_plan(self, segments: Segments) -> Plan | None:
        """The backend's segment form; a routing whose every token uses one adapter here
        takes the one-row plan instead (its GEMM path, whatever the input's shape)."""
        routed = segments.with_slots(self.row_targets(segments.slots))
        uniform = routed.uniform_slot()
        if uniform == NO_SLOT or not routed.live_slots():
            return None
        if uniform is not None:
            return self.backend.build_plan(self, [uniform])
        return self.backend.build_segment_plan(self, routed)

    def build_graph_plan(self, slots: torch.Tensor) -> Plan | None:
        if not any(self.slot_rank):
            return None
        return self.backend.build_graph_plan(self, slots)
