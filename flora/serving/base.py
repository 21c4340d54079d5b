"""Shared routing state and the base class of the served (multi-adapter) module wrappers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from flora.serving.factors import ModuleFactors
from flora.serving.segments import NO_SLOT, Segments

__all__ = ["NO_SLOT", "Plan", "RoutingState", "ServedModule", "ServingPolicy"]

Plan = Callable[[torch.Tensor], torch.Tensor]
"""A module's forward for one routing: everything that depends only on the routing
(gathered factors, masks, row groups) is captured when the plan is built."""


@dataclass(frozen=True)
class ServingPolicy:
    """Which per-row kernel a plan uses; chosen once per routing, per module.

    Two-mode layers (Linear, Conv1D) with ``K`` distinct adapters of ranks ``r_k`` in the
    batch: "wide" (``(x @ [A_1..A_K]) * mask @ [B_1..B_K]``: 3 ops, no gathers, but
    ``sum r_k`` columns for every row; 2 ops and no mask when every row uses one adapter)
    when the batch is homogeneous or ``sum r_k <= wide_max_rank``, else "rows" (per-row
    ``bmm`` with factors gathered once per routing, padded to ``max r_k``: 2 ops).
    ``ServingModel`` defaults ``wide_max_rank`` to 32 on CPU and 0 on CUDA, where small
    decode steps are bound by kernel launches and the 2-op "rows" measured faster.
    ConvNd: "segments" (rows grouped by adapter, each group run once with the merged
    weight ``W + dW_k``) unless more than ``conv_segments_max`` distinct groups, then
    "rows" (one grouped conv over ``B * groups`` with per-row merged weights) if the
    per-row weight stack stays under ``conv_rows_max_numel`` elements.
    bench/kernels.py measures the trade-offs these defaults come from; ``shared_inputs``
    cuts the per-step op count for llama-style blocks (see its note).

    Which backend serves a module is ``flora.serving.backends.select``'s choice, from
    the two switches below, the module's device and its dtype; the same backend serves
    segment routings (``Segments``) with its segment form (the kernel switches below
    cover both forms; "wide"/"rows" are per-row only).
    ``cpu_kernel``: float32 Linear/Conv1D on the CPU run every per-row routing through
    the fused row kernel of ``flora.serving.backends.numba_cpu`` (one kernel call per group of
    sibling projections, each row's own rank of work) when numba is importable; the torch
    kernels above are then the fallback (autograd, other dtypes) and the reference.
    ``gpu_kernel``: Linear/Conv1D on a CUDA device run every per-row routing through the
    Triton kernel of ``flora.serving.backends.triton_gpu`` (SGMV/BGMV style: each row's slot read
    in place up to its own rank) when triton is installed and its self-test passes on
    that device; the torch kernels are then the fallback (autograd) and the reference.
    ``factor_dtype``: storage of those modules' factor banks when the kernel serves them
    (``None``: the model's dtype). ``torch.bfloat16`` halves the bytes each distinct
    adapter costs per decode step (the kernel widens to float32 as it reads and
    accumulates in float32); every path, merging included, then reads the same rounded
    factors, so merged and per-row results still agree.
    """

    wide_max_rank: int = 32
    cpu_kernel: bool = True
    gpu_kernel: bool = True
    factor_dtype: torch.dtype | None = None
    conv_segments_max: int = 8
    conv_rows_max_numel: int = 1 << 24
    shared_inputs: tuple[tuple[str, ...], ...] = (
        ("q_proj", "k_proj", "v_proj"),
        ("gate_proj", "up_proj"),
    )
    """Sibling Linear modules (same parent, these child names) that a model calls one
    after the other on the same input tensor: their plans share one shrink
    (``x @ [A_q | A_k | A_v]``), which each then slices. The sharing is used only when a
    member is called with the very tensor object the shrink was computed from, once per
    member, so a model that does not call them that way just computes its own shrink."""

    def __post_init__(self) -> None:
        if self.factor_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(
                f"factor_dtype must be None, torch.float32 or torch.bfloat16, not "
                f"{self.factor_dtype}"
            )


class RoutingState:
    """The routing all wrapped modules of one ``ServingModel`` read (one shared object).

    ``plans[i]`` is wrapped module ``i``'s plan for the current routing, or ``None`` when
    no row of the batch uses an adapter that targets it (that module then costs only a
    list lookup on top of its base layer). ``rows`` is the batch size the plans expect
    (per-row routing), ``tokens`` the flattened token count (segment routing); ``routed``
    is the routing as set (row slots, or the ``Segments``).
    """

    __slots__ = ("plans", "routed", "rows", "tokens")

    def __init__(self) -> None:
        self.plans: list[Plan | None] = []
        self.rows: int | None = None
        self.tokens: int | None = None
        self.routed: tuple[int, ...] | Segments | None = None


class ServedModule(nn.Module):
    """Wraps one base module: a bank of ``max_slots`` adapter slots plus the forward.

    Subclasses implement ``write_slot`` (copy an adapter's tensors in at load time),
    ``clear_slot``, ``build_plan`` (per routing) and ``delta_weight`` (for merging).
    Forward is the base layer unless the current routing gave this module a plan.
    """

    kinds: frozenset[str] = frozenset()

    def __init__(
        self,
        base_layer: nn.Module,
        routing: RoutingState,
        index: int,
        max_slots: int,
        max_rank: int,
        policy: ServingPolicy,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.index = index
        self.max_slots = max_slots
        self.max_rank = max_rank
        self.policy = policy
        # rank of each slot's update for this module; 0 = slot does not target it.
        self.slot_rank: list[int] = [0] * max_slots

    @property
    def weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{type(self.base_layer).__name__}.weight is not a tensor")
        return weight

    @property
    def plan(self) -> Plan | None:
        """This module's plan for the current routing (``None``: its base layer serves)."""
        return self.routing.plans[self.index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        if plan is None:
            return self.base_layer(x)
        if self.routing.tokens is not None:
            if self.token_count(x) != self.routing.tokens:
                raise ValueError(
                    f"input has {self.token_count(x)} tokens, the segments cover "
                    f"{self.routing.tokens}: call set_routing for this batch"
                )
        elif x.shape[0] != self.routing.rows:
            raise ValueError(
                f"input has {x.shape[0]} rows, the routing has {self.routing.rows}: "
                "call set_routing for this batch"
            )
        return plan(x)

    def token_count(self, x: torch.Tensor) -> int:
        """The flattened token count of an input (``[..., in]`` features per token)."""
        return x.numel() // x.shape[-1]

    def targets(self, slot: int) -> bool:
        return 0 <= slot < self.max_slots and self.slot_rank[slot] > 0

    def row_targets(self, row_slots: Sequence[int]) -> list[int]:
        """Per row, the slot if it targets this module, else ``NO_SLOT``."""
        return [s if s >= 0 and self.slot_rank[s] > 0 else NO_SLOT for s in row_slots]

    # -- subclass API -------------------------------------------------------------------
    def check(self, name: str, mf: ModuleFactors) -> None:
        """Raise ``ValueError`` if ``mf`` does not fit this module (called before any write)."""
        raise NotImplementedError

    def write_slot(self, slot: int, mf: ModuleFactors) -> None:
        raise NotImplementedError

    def clear_slot(self, slot: int) -> None:
        raise NotImplementedError

    def build_plan(self, row_slots: Sequence[int]) -> Plan | None:
        raise NotImplementedError

    def build_segment_plan(self, segments: Segments) -> Plan | None:
        """The plan for a packed forward whose tokens are ``segments`` (SGMV); modules
        whose inputs are not token sequences (convolutions) refuse it."""
        raise ValueError(
            f"{type(self).__name__} routes whole rows, not token segments: call set_routing "
            "with one slot per row"
        )

    def build_graph_plan(self, slots: torch.Tensor) -> Plan | None:
        """The forward for rows whose slots are read from ``slots`` (``[B]`` int32 on the
        device) at call time (``Backend.build_graph_plan``), or ``None`` when no slot
        targets this module. Raises ``NotImplementedError`` for wrappers without one."""
        raise NotImplementedError(f"{type(self).__name__} has no graph plan")

    def invalidate(self) -> None:
        """The base weight changed (merge/unmerge): drop anything derived from it."""

    def delta_weight(self, slot: int) -> torch.Tensor:
        """``dW`` of ``slot`` in the base weight's layout, float32."""
        raise NotImplementedError

    def merge_into_weight(self, slot: int) -> None:
        """``W <- W + dW(slot)`` in place (rounded once to the weight's dtype). Subclasses
        may do it without materialising ``dW`` separately."""
        w = self.weight
        w.copy_((w.float() + self.delta_weight(slot)).to(w.dtype))
