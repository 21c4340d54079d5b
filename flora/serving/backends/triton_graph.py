"""``TritonBackend``'s plans under CUDA graphs (``ServingModel.set_graph_routing``): every
row's slot read from the caller's buffer when the graph replays, and the decode deltas
computed where the step computes the projections' input anyway.

- ``TritonGraphPlan``: one projection; ``silu_mul`` and ``o_delta`` hand its delta to the
  kernel that forms its input (SiLU-multiply, decode attention).
- ``share_graph_plans``: sibling projections (q/k/v, gate/up) become one ``_DecodeGroup``:
  one launch writes every member's delta (``rms_norm_with_deltas``: the norm that forms
  their input does it), and where their weights are one tensor, one GEMM computes their
  outputs.
- ``silu_mul_with_delta``, ``attention_o_delta``: the hand-offs the engine's fused kernels
  call (``flora_server.engine.paged.fused_install``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from flora.serving.backends.base import PerInput, RowTarget
from flora.serving.backends.triton_kernel import (
    Member,
    TritonRowKernel,
    block_rank,
    member_arg,
    token_rows,
)
from flora.serving.base import Plan
from flora.serving.siblings import concatenated

__all__ = [
    "ODelta",
    "TritonGraphPlan",
    "attention_o_delta",
    "rms_norm_with_deltas",
    "share_graph_plans",
    "silu_mul_with_delta",
]


class ODelta(NamedTuple):
    """What a kernel producing a projection's input needs to write that projection's
    decode delta too (``_prologue_triton.o_epilogue``, from the engine's decode attention):
    the rows' slots, the projection (``member_arg``: banks, ranks, the delta buffer the
    projection's call then takes), the rows' done-counts (zeros, left zero) and the rank
    tile."""

    slots: torch.Tensor
    proj: tuple[object, ...]
    done: torch.Tensor
    block_r: int


class TritonGraphPlan:
    """``_TritonPlan`` for CUDA graphs: the row slots are read from the caller's buffer
    (refilled in place between replays) and every slot counts as the bank's full rank
    capacity (its padding is zero, so the result is exact, and a slot loaded later needs
    no new plan as long as the bank is not re-allocated).

    ``silu_mul`` is the prologue form for a projection fed by ``SiLU(gate) * up`` (down):
    one launch forms the product and this plan's delta of it, and the call on that very
    product is then one ``addmm``."""

    __slots__ = (
        "a", "b", "base", "block_r", "done", "kernel", "ranks", "seeded", "slots", "target"
    )  # fmt: skip

    def __init__(self, target: RowTarget, kernel: TritonRowKernel, slots: torch.Tensor) -> None:
        bank = target.bank
        self.base, self.kernel, self.a, self.b = target.base_forward, kernel, bank.a, bank.b
        self.slots, self.target = slots, target
        self.ranks = torch.full(
            (bank.max_slots + 1,), bank.capacity, dtype=torch.int32, device=bank.device
        )
        self.block_r = block_rank(bank.capacity)
        self.seeded = PerInput(1)  # the delta `silu_mul` or `o_delta` computed, for its input
        self.done: torch.Tensor | None = None  # `o_delta`'s row counts, made on first use

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = token_rows(x)
        d = self.seeded.seeded(x, 0)
        if d is not None:
            return torch.addmm(d, x2, self.target.weight_t).view(*x.shape[:-1], d.shape[1])
        y = self.base(x)
        self.kernel(
            y.view(-1, y.shape[-1]), x2, self.slots, self.ranks, self.a, self.b, self.block_r
        )
        return y

    def fused_input(self, shape: Sequence[int], dtype: torch.dtype) -> bool:
        """Whether a launch that forms this projection's input (rows of ``shape`` and
        ``dtype``) can compute its delta too: the prologue kernels passed their self-test,
        one row per routed row, the projection's input width and dtype."""
        weight = self.target.weight_t
        return (
            self.kernel.prologues is not None
            and tuple(shape) == (self.slots.shape[0], weight.shape[0])
            and dtype == weight.dtype
        )

    def member(self, d: torch.Tensor) -> Member:
        """This projection as a kernel writes its delta into ``d``: with its bias, so
        that ``addmm(d, x, W^T)`` is its whole output."""
        return Member(d, self.ranks, self.a, self.b, self.target.base_bias)

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
        """``SiLU(gate) * up`` and, in the same launch, this plan's delta of it, which the
        call on the returned tensor takes (``kernel.act_decode``); ``None`` where that
        does not apply (not one token per routed row, another dtype or width: the caller
        forms the product itself)."""
        g2, u2 = token_rows(gate), token_rows(up)
        if (
            g2.shape != u2.shape
            or gate.dtype != up.dtype
            or not self.fused_input(g2.shape, gate.dtype)
        ):
            return None
        act = torch.empty_like(g2)
        d = act.new_empty(act.shape[0], self.target.weight_t.shape[1])
        self.kernel.act_decode(g2, u2, act, self.slots, self.member(d), self.block_r)
        out = act.view(gate.shape)
        self.seeded.seed(out, d)
        return out

    def o_delta(self, x: torch.Tensor) -> ODelta | None:
        """For a kernel about to write this projection's input ``x`` ([T, in], contiguous,
        one token per routed row): the arguments with which it writes this plan's delta
        of ``x`` too, which the call on ``x`` (or a view of its elements) then takes;
        ``None`` where that does not apply (the caller's kernel leaves it, and the call
        computes its own). The done-counts are made on first use, which is never inside a
        recording: a graph is recorded after the same forward ran twice."""
        if not x.is_contiguous() or not self.fused_input(x.shape, x.dtype):
            return None
        if self.done is None:
            self.done = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
        d = x.new_empty(x.shape[0], self.target.weight_t.shape[1])
        self.seeded.seed(x, d)
        proj = member_arg(self.member(d))
        return ODelta(self.slots, proj, self.done, self.block_r)


class _Deltas:
    """What one launch wrote for a group's members on one input: each member's delta
    (columns of ``cat`` where the members' weights are one tensor), and, once the first
    member computed it, the members' outputs side by side (``out``)."""

    __slots__ = ("cat", "deltas", "out")

    def __init__(self, deltas: list[torch.Tensor], cat: torch.Tensor | None) -> None:
        self.deltas, self.cat = deltas, cat
        self.out: torch.Tensor | None = None


class _DecodeGroup:
    """2 or 3 sibling ``TritonGraphPlan``s (same input) served by one launch per decode
    step: the first member to run on an input writes every member's delta
    (``row_decode_group``), and the members' base GEMMs add them (``addmm``), so the group
    costs one kernel where the members cost one each. Where the members' weights are one
    tensor (``flora.serving.siblings.concatenated``: the engine makes them so), the deltas
    are columns of one buffer and one ``addmm`` over that tensor computes every member's
    output, each taking its columns: one GEMM for the group too. The buffers are allocated
    by the launch and dropped once every member took its own: in a CUDA graph they are
    intermediates of the recording, from the graphs' shared pool, not memory each graph
    keeps (at 2,048 rows, about 16 MiB per layer for SmolLM2)."""

    def __init__(self, plans: Sequence[TritonGraphPlan]) -> None:
        self.plans = list(plans)
        self.kernel, self.slots = plans[0].kernel, plans[0].slots
        self.block_r = max(p.block_r for p in plans)
        self.shared = PerInput(len(plans))
        # one GEMM for the members where their weights are one tensor: [in, sum of outs]
        joint = concatenated([p.target.weight for p in plans])
        self.weight_t = None if joint is None else joint.weight.t()
        self.columns = [] if joint is None else joint.columns

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
        """``x`` through the Llama RMSNorm and, in the same launch, every member's delta of
        the result, which the members take when called on the returned tensor
        (``kernel.norm_decode_group``); ``None`` where that does not apply (not one token
        per routed row, another width or dtype: the caller normalises ``x`` itself)."""
        x2, dtype = token_rows(x), torch.promote_types(weight.dtype, x.dtype)
        if weight.shape != x2.shape[1:] or not self.plans[0].fused_input(x2.shape, dtype):
            return None  # the members share their input width, dtype and rows
        y = torch.empty(x2.shape, dtype=dtype, device=x.device)
        deltas, members = self._members(y)
        self.kernel.norm_decode_group(x2, weight, eps, y, self.slots, members, self.block_r)
        out = y.view(x.shape)
        self.shared.seed(out, deltas)
        return out

    def output(self, x: torch.Tensor, x2: torch.Tensor, member: int) -> torch.Tensor:
        """``member``'s output for ``x`` (``x2``: its rows): its base GEMM plus its delta,
        from the group's one launch (made now by the first member, unless a norm's launch
        made it with ``x``)."""

        def launch() -> _Deltas:
            deltas, members = self._members(x2)
            self.kernel.decode_group(x2, self.slots, members, self.block_r)
            return deltas

        deltas: _Deltas = self.shared.take(x, member, launch)
        if self.weight_t is None or deltas.cat is None:
            weight_t = self.plans[member].target.weight_t
            return torch.addmm(deltas.deltas[member], x2, weight_t)
        if deltas.out is None:
            deltas.out = torch.addmm(deltas.cat, x2, self.weight_t)
        first, end = self.columns[member]
        return deltas.out[:, first:end]

    def _members(self, x2: torch.Tensor) -> tuple[_Deltas, list[Member]]:
        """Each member's delta buffer for the rows of ``x2`` (the members' input), and the
        kernel's ``Member`` (its bias included) per member."""
        if self.weight_t is None:
            cat = None
            outs = [x2.new_empty(x2.shape[0], p.target.weight.shape[0]) for p in self.plans]
        else:
            cat = x2.new_empty(x2.shape[0], self.weight_t.shape[1])
            outs = [cat[:, first:end] for first, end in self.columns]
        members = [p.member(d) for d, p in zip(outs, self.plans, strict=True)]
        return _Deltas(outs, cat), members


class _GroupMemberPlan:
    """A member of a ``_DecodeGroup``: ``y = x @ W^T + d`` in one GEMM (shared with its
    siblings where their weights are one tensor), ``d`` the delta the group wrote for this
    member. A forward of more than one token per row (not a decode step) takes the
    member's own plan."""

    __slots__ = ("alone", "group", "member", "rows")

    def __init__(self, group: _DecodeGroup, member: int, alone: TritonGraphPlan) -> None:
        self.group, self.member, self.alone = group, member, alone
        self.rows = alone.slots.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = token_rows(x)
        if x2.shape[0] != self.rows:
            return self.alone(x)
        y = self.group.output(x, x2, self.member)
        return y.view(*x.shape[:-1], y.shape[1])


def rms_norm_with_deltas(
    plans: Sequence[Plan | None], x: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor | None:
    """``x`` through the Llama RMSNorm, with the decode deltas of the projections that
    read the result computed in the same launch. ``plans``: the current plans of the
    projections of the module the result goes to (a llama layer's attention or MLP);
    where the decode-group members among them (graph routing on CUDA:
    ``TritonBackend.share`` groups q/k/v, gate/up) are one whole group, it serves them.
    ``None`` otherwise (the caller normalises ``x`` itself, and each member computes its
    own delta as usual)."""
    members = [p for p in plans if isinstance(p, _GroupMemberPlan)]
    if not members:
        return None
    group = members[0].group
    if any(p.group is not group for p in members) or len(group.plans) != len(members):
        return None
    return group.rms_norm(x, weight, eps)


def silu_mul_with_delta(
    plan: Plan | None, gate: torch.Tensor, up: torch.Tensor
) -> torch.Tensor | None:
    """``SiLU(gate) * up`` with the decode delta of the projection that reads it (its
    current ``plan``: a graph plan on CUDA) computed in the same launch; ``None``
    otherwise (the caller forms the product itself)."""
    if not isinstance(plan, TritonGraphPlan):
        return None
    return plan.silu_mul(gate, up)


def attention_o_delta(plan: Plan | None, x: torch.Tensor) -> ODelta | None:
    """The arguments with which the engine's decode attention, about to write ``x``,
    writes the decode delta of the projection that reads it (o; its current ``plan``: a
    graph plan on CUDA) in the same launch (``TritonGraphPlan.o_delta``); ``None``
    otherwise (o computes its own)."""
    if not isinstance(plan, TritonGraphPlan):
        return None
    return plan.o_delta(x)


def share_graph_plans(plans: Sequence[Plan | None]) -> list[Plan | None]:
    """2 or 3 graph plans of siblings with one input width and dtype become one
    ``_DecodeGroup`` (one launch a decode step instead of one per member), beside
    siblings without a plan (no loaded adapter targets them: they run their base
    layer); any other mix is left as it is."""
    live = [p for p in plans if isinstance(p, TritonGraphPlan)]
    if not 2 <= len(live) <= 3 or len(live) != sum(p is not None for p in plans):
        return list(plans)
    targets = [p.target for p in live]
    same = {(t.weight.shape[1], t.weight.dtype, t.weight.device) for t in targets}
    if len(same) != 1:
        return list(plans)
    group = _DecodeGroup(live)
    members = iter(_GroupMemberPlan(group, m, p) for m, p in enumerate(live))
    return [None if p is None else next(members) for p in plans]
