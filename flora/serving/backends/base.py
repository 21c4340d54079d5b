"""The interface every kernel backend implements, and what it reads from a served module.

A backend adds the per-row low-rank update ``y[n] += (x[n] @ A_s) @ B_s`` (``s``: row
``n``'s slot) to a two-mode module's base output (Linear, transformers Conv1D), or the same
update per token segment of a packed forward (``Segments``: each contiguous range of
tokens with its slot, SGMV). It owns four things: the capability check (``load``: may it
serve modules of this dtype on this device under this policy, self-test included), the
plan for one per-row routing (``build_plan``), the plan for one segment routing
(``build_segment_plan``) and, optionally, sharing work between sibling projections that
read the same input (``share``: one shrink for q/k/v, one for gate/up).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

import torch

from flora.serving.bank import DeviceSlotBank
from flora.serving.base import Plan, ServingPolicy
from flora.serving.segments import Segments

__all__ = ["Backend", "PerInput", "RowTarget"]


class RowTarget(Protocol):
    """What a backend reads from the served module it builds plans for (``ServedLinear``)."""

    bank: DeviceSlotBank  # the slots' folded factors
    slot_rank: list[int]  # per slot, the rank of its update here (0: not targeted)
    policy: ServingPolicy

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = base(x)``, shaped like ``x`` but ``out`` wide."""
        ...

    @property
    def weight(self) -> torch.Tensor: ...

    @property
    def weight_t(self) -> torch.Tensor:
        """The base weight as ``[in, out]`` (a view)."""
        ...

    @property
    def base_bias(self) -> torch.Tensor | None: ...


class Backend(ABC):
    """One way to apply per-row updates; ``flora.serving.backends.select`` picks one per
    module (first in ``BACKENDS`` whose ``load`` gives an instance)."""

    name: ClassVar[str]
    rank_major: ClassVar[bool] = False
    """The bank layout it reads in place: ``A`` stored as ``(S + 1, R, n_in)``."""
    narrow_factors: ClassVar[bool] = False
    """Whether it reads factors stored as ``policy.factor_dtype`` (widening as it reads)."""

    @classmethod
    @abstractmethod
    def load(
        cls, policy: ServingPolicy, device: torch.device, dtype: torch.dtype
    ) -> Backend | None:
        """The capability check: an instance for modules of ``dtype`` on ``device`` when
        ``policy`` allows this backend and it works there (self-test included), else
        ``None``. Called once per module: expensive checks are cached by the backend."""

    @abstractmethod
    def build_plan(self, target: RowTarget, rows: list[int]) -> Plan:
        """The forward of ``target`` for one routing: ``rows`` holds each batch row's slot,
        or ``NO_SLOT`` (at least one row has a slot)."""

    @abstractmethod
    def build_segment_plan(self, target: RowTarget, segments: Segments) -> Plan:
        """The forward of ``target`` for one packed routing: the input's flattened tokens
        (``x.reshape(-1, in)``) are ``segments.total`` rows, and each segment's tokens use
        its slot (``NO_SLOT``, or a slot of rank > 0 here; at least two distinct slots,
        base included, or the caller would have used ``build_plan`` with one row)."""

    def build_graph_plan(self, target: RowTarget, slots: torch.Tensor) -> Plan:
        """The forward of ``target`` that reads each row's slot from ``slots`` (``[B]``
        int32 on the device, ``NO_SLOT`` for a base row) when it runs, not when it is
        built: a CUDA graph captured once then serves every routing of ``B`` rows, the
        caller refilling ``slots`` in place before each replay. A row whose slot does not
        target the module reads that slot's zeroed bank entry. Default: torch ops that
        gather each row's factors on every call (any device and dtype)."""
        return _GatherPlan(target, slots)

    def share(self, plans: Sequence[Plan | None]) -> list[Plan | None]:
        """The plans of one group of sibling modules (same parent, same input; ``None``
        where no row uses an adapter that targets the member) turned into members of one
        shared computation, where this backend can share; else unchanged."""
        return list(plans)

    def factor_dtype(self, policy: ServingPolicy, dtype: torch.dtype) -> torch.dtype:
        """The dtype of the factor bank of a module of ``dtype`` served by this backend."""
        if self.narrow_factors and policy.factor_dtype is not None:
            return policy.factor_dtype
        return dtype


class PerInput:
    """A value computed from one input for a group of sibling members (q/k/v, gate/up) and
    handed to each member once: the first member to run on an input computes it; it is
    reused only for the same input (the same tensor object, or a contiguous view of the
    same elements: transformers reshapes an attention output before o reads it), and by
    each member once, so when every member took it (or a member comes back with the same
    input) it is computed afresh and a later pass that refills the same input buffer is
    not served an old value. Assumed: the input is not modified in place between the
    sibling calls of one pass (true of llama-style blocks, which feed one normalised
    hidden state to q, k and v, and to gate and up)."""

    __slots__ = ("members", "pending", "value", "x")

    def __init__(self, members: int) -> None:
        self.members = members
        self.x: torch.Tensor | None = None
        self.value: Any = None
        self.pending: set[int] = set()

    def seed(self, x: torch.Tensor, value: Any) -> None:
        """Hand ``value`` to the members for input ``x``: computed by whatever produced
        ``x`` (a norm kernel that also computes the siblings' deltas), so no member
        computes it."""
        self.x, self.value, self.pending = x, value, set(range(self.members))

    def seeded(self, x: torch.Tensor, member: int) -> Any:
        """What ``seed`` handed over for ``x`` if ``member`` has not taken it yet (taking
        it now), else ``None``."""
        if not self._holds(x) or member not in self.pending:
            return None
        return self.take(x, member, lambda: None)

    def take(self, x: torch.Tensor, member: int, compute: Callable[[], Any]) -> Any:
        if not self._holds(x) or member not in self.pending:
            self.x, self.value, self.pending = x, compute(), set(range(self.members))
        self.pending.discard(member)
        value = self.value
        if not self.pending:  # every member served: drop the references
            self.x = self.value = None
        return value

    def _holds(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is the input held: the same object, or the same elements (same
        start, count, dtype and device, both contiguous; the held tensor keeps its memory
        from being reused, so a match is a view of it)."""
        held = self.x
        if held is None or held is x:
            return held is x
        return (
            x.data_ptr() == held.data_ptr()
            and x.numel() == held.numel()
            and x.dtype == held.dtype
            and x.device == held.device
            and x.is_contiguous()
            and held.is_contiguous()
        )


class _GatherPlan:
    """Graph-safe "rows": every call gathers each row's factors from the bank by the slot
    ids in ``slots`` (a device buffer the caller refills between calls), so nothing of a
    routing is baked in: ``y += bmm(bmm(x, A[s]), B[s])`` over the bank's full rank
    capacity (its padding is zero, so the result is exact)."""

    __slots__ = ("a", "b", "base", "dtype", "null", "slots")

    def __init__(self, target: RowTarget, slots: torch.Tensor) -> None:
        bank = target.bank
        self.base, self.a, self.b, self.slots = target.base_forward, bank.a, bank.b, slots
        self.null = torch.tensor(bank.null_slot, dtype=slots.dtype, device=slots.device)
        self.dtype = target.weight.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        index = torch.where(self.slots < 0, self.null, self.slots)  # base rows: zero slot
        a = self.a.index_select(0, index).to(self.dtype)  # [B, in, R]
        b = self.b.index_select(0, index).to(self.dtype)  # [B, R, out]
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        y.view(y.shape[0], -1, y.shape[-1]).baddbmm_(torch.bmm(x3, a), b)
        return y
