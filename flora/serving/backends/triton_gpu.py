"""A Triton per-row low-rank kernel for CUDA serving (SGMV/BGMV style), behind a
capability check.

Why: on a GPU the torch "rows" path gathers every row's factors into a contiguous copy
once per routing and runs two batched matmuls over ranks padded to the batch's largest.
The Triton kernel (``_row_kernel_triton``) reads each row's slot in place from the bank
and only up to that slot's own rank, and a row without an adapter costs nothing: one
launch per projection (after the base GEMM) whatever the mix of adapters and ranks, where
"rows" makes two.

``gpu_kernel_for()`` / ``triton_row_kernel()`` are the capability check: ``None`` (the
torch paths then serve, and they stay the reference the kernel is tested against)
unless triton imports, the module is on a CUDA device, and a self-test of the kernel on
that device matches the float64 reference (``triton_kernel``: the launchers, references
and self-test). ``TritonBackend`` serves a module through it (``_TritonPlan`` per
routing, ``_TritonSegmentPlan`` per packed step, ``_TritonGraphPlan`` and the sibling
groups under CUDA graphs, with ``rms_norm_with_deltas`` / ``silu_mul_with_delta``: the
decode deltas computed inside the kernel that produces the projections' input).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar

import torch

from flora.serving.backends.base import Backend, PerInput, RowTarget
from flora.serving.backends.torch_paths import torch_plan, torch_segment_plan
from flora.serving.backends.triton_kernel import (
    KERNEL_MODULES,
    TritonRowKernel,
    block_rank,
    load_row_kernel,
    member_arg,
    reference,
    reference_rms_norm,
    reference_silu_mul,
    segment_tiles,
    self_test,
    self_test_prologues,
    token_rows,
)
from flora.serving.base import NO_SLOT, Plan, ServingPolicy
from flora.serving.segments import Segments

__all__ = [  # with the launchers, references and self-test of `triton_kernel`
    "KERNEL_MODULES",
    "ODelta",
    "TritonBackend",
    "TritonRowKernel",
    "attention_o_delta",
    "block_rank",
    "gpu_kernel_for",
    "load_row_kernel",
    "member_arg",
    "reference",
    "reference_rms_norm",
    "reference_silu_mul",
    "rms_norm_with_deltas",
    "segment_tiles",
    "self_test",
    "self_test_prologues",
    "self_tested",
    "silu_mul_with_delta",
    "token_rows",
    "triton_applies",
    "triton_row_kernel",
]

log = logging.getLogger(__name__)
K = TypeVar("K")

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Where the project's Triton kernels may serve at all: a CUDA device and a float dtype
    they are written for (``self_tested`` then decides)."""
    return device.type == "cuda" and dtype in _DTYPES


def self_tested(
    what: str, make: Callable[[], K], device: torch.device, dtype: torch.dtype
) -> K | None:
    """The one capability rule of the project's Triton kernels: ``make()`` (imports the
    Triton module, builds the kernels and runs their self-test on ``device``), or ``None``
    when ``FLORA_TRITON=0``, triton is missing, or it fails to compile or to match its
    reference there (logged; callers cache the answer, so once)."""
    if os.environ.get("FLORA_TRITON", "1") == "0":
        return None
    try:
        return make()
    except ImportError:
        return None
    except Exception as exc:  # a compiler or driver error, or a wrong result
        log.warning("%s disabled on %s (%s): %s", what, device, dtype, exc)
        return None


@functools.cache
def triton_row_kernel(device: torch.device, dtype: torch.dtype) -> TritonRowKernel | None:
    """The kernel for ``dtype`` modules on ``device`` after a self-test there, or ``None``
    (``self_tested``: the torch paths then serve)."""

    def make() -> TritonRowKernel:
        kernel = load_row_kernel()
        self_test(kernel, device, dtype)
        try:
            self_test_prologues(kernel, device, dtype)
        except Exception as exc:  # the row kernels serve on; the prologues only are off
            log.warning("triton prologue kernels disabled on %s (%s): %s", device, dtype, exc)
            kernel.prologues = None
        return kernel

    return self_tested("triton row kernel", make, device, dtype)


def gpu_kernel_for(
    enabled: bool, device: torch.device, dtype: torch.dtype
) -> TritonRowKernel | None:
    """The kernel for a module of ``dtype`` on ``device`` when the policy ``enabled``
    it: CUDA only, and only where ``triton_row_kernel()`` passes."""
    if enabled and triton_applies(device, dtype):
        return triton_row_kernel(device, dtype)
    return None


class _TritonPlan:
    """CUDA: ``y = base(x)``, then the Triton kernel adds every row's ``(x @ A_s) @ B_s``
    in place, reading each row's slot from the bank up to its own rank. The routing (row
    slots, then every slot's rank here) goes to the device once, when the plan is built.
    ``torch_plan`` builds the torch path, used instead when autograd is recording.
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

    def __init__(
        self,
        target: RowTarget,
        kernel: TritonRowKernel,
        rows: list[int],
        torch_plan: Callable[[], Plan],
    ) -> None:
        bank = target.bank
        self.base, self.kernel, self.a, self.b = target.base_forward, kernel, bank.a, bank.b
        ranks = [*target.slot_rank, 0]
        key = ("rows", tuple(rows), tuple(ranks))
        meta = kernel.table(key, lambda: [*rows, *ranks], bank.device)
        self.slots, self.ranks = meta[: len(rows)], meta[len(rows) :]
        self.block_r = block_rank(max(ranks[s] for s in rows if s != NO_SLOT))
        self.torch_plan = torch_plan
        self.torch_path: Plan | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            if self.torch_path is None:
                self.torch_path = self.torch_plan()
            return self.torch_path(x)
        y = self.base(x)
        x2 = token_rows(x)
        self.kernel(
            y.view(-1, y.shape[-1]), x2, self.slots, self.ranks, self.a, self.b, self.block_r
        )
        return y


class _TritonSegmentPlan:
    """CUDA, a segment routing: ``y = base(x)``, then one launch of the segment kernel adds
    every adapted segment's ``(x_seg @ A_s) @ B_s`` in place (a program per tile of up to
    ``block_t`` tokens of one segment and per output tile: a prefill chunk's factors are
    read by its few tiles, not gathered per token). The tiles and the ranks go to the
    device once, when the plan is built; ``torch_plan`` serves under autograd."""

    __slots__ = (
        "a",
        "b",
        "base",
        "block_r",
        "kernel",
        "ranks",
        "tiles",
        "torch_path",
        "torch_plan",
    )

    def __init__(
        self,
        target: RowTarget,
        kernel: TritonRowKernel,
        segments: Segments,
        torch_plan: Callable[[], Plan],
    ) -> None:
        bank = target.bank
        self.base, self.kernel, self.a, self.b = target.base_forward, kernel, bank.a, bank.b
        ranks = [*target.slot_rank, 0]  # ranks[NO_SLOT] is 0

        def table() -> list[int]:  # cut only when no projection of this step did it yet
            firsts, ends, slots = segment_tiles(segments, ranks, kernel.block_t)
            return [*firsts, *ends, *slots, *ranks]

        meta = kernel.table(("segments", segments, tuple(ranks)), table, bank.device)
        n_tiles = (meta.shape[0] - len(ranks)) // 3
        self.tiles = meta[: 3 * n_tiles].view(3, n_tiles)
        self.ranks = meta[3 * n_tiles :]
        self.block_r = block_rank(max((ranks[s] for s in segments.slots), default=0))
        self.torch_plan = torch_plan
        self.torch_path: Plan | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            if self.torch_path is None:
                self.torch_path = self.torch_plan()
            return self.torch_path(x)
        y = self.base(x)
        x2 = token_rows(x)
        self.kernel.segments(
            y.view(-1, y.shape[-1]), x2, self.tiles, self.ranks, self.a, self.b, self.block_r
        )
        return y


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


class _TritonGraphPlan:
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
        one row per routed row, the projection's input width and dtype, no bias (the
        delta is all the call adds to one GEMM)."""
        weight = self.target.weight_t
        return (
            self.kernel.prologues is not None
            and tuple(shape) == (self.slots.shape[0], weight.shape[0])
            and dtype == weight.dtype
            and self.target.base_bias is None
        )

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
        """``SiLU(gate) * up`` and, in the same launch, this plan's delta of it, which the
        call on the returned tensor takes (``kernel.act_decode``); ``None`` where that
        does not apply (not one token per routed row, a bias, another dtype or width:
        the caller forms the product itself)."""
        g2, u2 = token_rows(gate), token_rows(up)
        if (
            g2.shape != u2.shape
            or gate.dtype != up.dtype
            or not self.fused_input(g2.shape, gate.dtype)
        ):
            return None
        act = torch.empty_like(g2)
        d = act.new_empty(act.shape[0], self.target.weight_t.shape[1])
        self.kernel.act_decode(
            g2, u2, act, self.slots, (d, self.ranks, self.a, self.b), self.block_r
        )
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
        proj = member_arg((d, self.ranks, self.a, self.b))
        return ODelta(self.slots, proj, self.done, self.block_r)


class _DecodeGroup:
    """2 or 3 sibling ``_TritonGraphPlan``s (same input, no bias) served by one launch per
    decode step: the first member to run on an input writes every member's delta into a
    buffer of its own (``row_decode_group``), and each member's base GEMM adds its own
    (``addmm``), so the group costs one kernel where the members cost one each. The
    buffers are allocated by the launch and dropped once every member took its own: in a
    CUDA graph they are intermediates of the recording, from the graphs' shared pool, not
    memory each graph keeps (at 2,048 rows, about 16 MiB per layer for SmolLM2)."""

    def __init__(self, plans: Sequence[_TritonGraphPlan]) -> None:
        self.plans = list(plans)
        self.kernel, self.slots = plans[0].kernel, plans[0].slots
        self.block_r = max(p.block_r for p in plans)
        self.shared = PerInput(len(plans))

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
        """``x`` through the Llama RMSNorm and, in the same launch, every member's delta of
        the result, which the members take when called on the returned tensor
        (``kernel.norm_decode_group``); ``None`` where that does not apply (not one token
        per routed row, another width or dtype: the caller normalises ``x`` itself)."""
        x2, dtype = token_rows(x), torch.promote_types(weight.dtype, x.dtype)
        if weight.shape != x2.shape[1:] or not self.plans[0].fused_input(x2.shape, dtype):
            return None  # the members share their input width, dtype, rows and no bias
        y = torch.empty(x2.shape, dtype=dtype, device=x.device)
        outs, members = self._members(y)
        self.kernel.norm_decode_group(x2, weight, eps, y, self.slots, members, self.block_r)
        out = y.view(x.shape)
        self.shared.seed(out, outs)
        return out

    def delta(self, x: torch.Tensor, x2: torch.Tensor, member: int) -> torch.Tensor:
        def launch() -> list[torch.Tensor]:
            outs, members = self._members(x2)
            self.kernel.decode_group(x2, self.slots, members, self.block_r)
            return outs

        deltas: list[torch.Tensor] = self.shared.take(x, member, launch)
        return deltas[member]

    def _members(
        self, x2: torch.Tensor
    ) -> tuple[
        list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    ]:
        """Each member's delta buffer for the rows of ``x2`` (the members' input), and the
        kernel's ``(delta, ranks, a, b)`` per member."""
        outs = [x2.new_empty(x2.shape[0], p.target.weight.shape[0]) for p in self.plans]
        return outs, [(d, p.ranks, p.a, p.b) for d, p in zip(outs, self.plans, strict=True)]


class _GroupMemberPlan:
    """A member of a ``_DecodeGroup``: ``y = x @ W^T + d`` in one GEMM, ``d`` the delta the
    group wrote for this member. A forward of more than one token per row (not a decode
    step) takes the member's own plan."""

    __slots__ = ("alone", "group", "member", "rows", "weight_t")

    def __init__(self, group: _DecodeGroup, member: int, alone: _TritonGraphPlan) -> None:
        self.group, self.member, self.alone = group, member, alone
        self.weight_t = alone.target.weight_t
        self.rows = alone.slots.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = token_rows(x)
        if x2.shape[0] != self.rows:
            return self.alone(x)
        d = self.group.delta(x, x2, self.member)
        return torch.addmm(d, x2, self.weight_t).view(*x.shape[:-1], d.shape[1])


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
    if not isinstance(plan, _TritonGraphPlan):
        return None
    return plan.silu_mul(gate, up)


def attention_o_delta(plan: Plan | None, x: torch.Tensor) -> ODelta | None:
    """The arguments with which the engine's decode attention, about to write ``x``,
    writes the decode delta of the projection that reads it (o; its current ``plan``: a
    graph plan on CUDA) in the same launch (``_TritonGraphPlan.o_delta``); ``None``
    otherwise (o computes its own)."""
    if not isinstance(plan, _TritonGraphPlan):
        return None
    return plan.o_delta(x)


class TritonBackend(Backend):
    """CUDA, where the Triton kernel passes its self-test (``gpu_kernel_for``)."""

    name = "triton"

    def __init__(self, kernel: TritonRowKernel) -> None:
        self.kernel = kernel

    @classmethod
    def load(
        cls, policy: ServingPolicy, device: torch.device, dtype: torch.dtype
    ) -> TritonBackend | None:
        kernel = gpu_kernel_for(policy.gpu_kernel, device, dtype)
        return None if kernel is None else cls(kernel)

    def build_plan(self, target: RowTarget, rows: list[int]) -> Plan:
        return _TritonPlan(target, self.kernel, rows, lambda: torch_plan(target, rows))

    def build_segment_plan(self, target: RowTarget, segments: Segments) -> Plan:
        return _TritonSegmentPlan(
            target, self.kernel, segments, lambda: torch_segment_plan(target, segments)
        )

    def build_graph_plan(self, target: RowTarget, slots: torch.Tensor) -> Plan:
        return _TritonGraphPlan(target, self.kernel, slots)

    def share(self, plans: Sequence[Plan | None]) -> list[Plan | None]:
        """2 or 3 graph plans of bias-free siblings with one input width and dtype become
        one ``_DecodeGroup`` (one launch a decode step instead of one per member), beside
        siblings without a plan (no loaded adapter targets them: they run their base
        layer); any other mix is left as it is."""
        live = [p for p in plans if isinstance(p, _TritonGraphPlan)]
        if not 2 <= len(live) <= 3 or len(live) != sum(p is not None for p in plans):
            return list(plans)
        targets = [p.target for p in live]
        same = {(t.weight.shape[1], t.weight.dtype, t.weight.device) for t in targets}
        if len(same) != 1 or any(t.base_bias is not None for t in targets):
            return list(plans)
        group = _DecodeGroup(live)
        members = iter(_GroupMemberPlan(group, m, p) for m, p in enumerate(live))
        return [None if p is None else next(members) for p in plans]
