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
that device matches the float64 reference. ``TritonBackend`` serves a module through it
(``_TritonPlan`` per routing).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from types import ModuleType
from typing import TypeVar

import torch

from flora.serving.backends.base import Backend, PerInput, RowTarget
from flora.serving.backends.torch_paths import torch_plan, torch_segment_plan
from flora.serving.base import NO_SLOT, Plan, ServingPolicy
from flora.serving.segments import Segments, segment_delta

__all__ = [
    "TritonBackend",
    "TritonRowKernel",
    "gpu_kernel_for",
    "segment_tiles",
    "self_tested",
    "triton_applies",
    "triton_row_kernel",
]

log = logging.getLogger(__name__)
K = TypeVar("K")

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TritonRowKernel:
    """``kernel(y, x, slots, ranks, a, b, block_r)``: ``y[n] += (x[n] @ A[s]) @ B[s]`` with
    ``s = slots[n // tokens]`` for the ``B = len(slots)`` batch rows of ``tokens`` rows of
    ``x`` each; rows with slot -1, or a slot of rank 0 in ``ranks``, are left as they are.

    ``y: [N, out]`` and ``x: [N, in]`` on one device with unit stride along the last
    dimension; ``slots: [B]`` and ``ranks: [S]`` int32 on that device; ``a: [S, in, R]``
    and ``b: [S, R, out]`` a ``DeviceSlotBank``'s tensors, in any layout; ``block_r`` a
    power of two >= 16 and >= every rank the routing uses (``block_rank``).
    """

    block_t = 16  # tokens per program (tl.dot's minimum tile)
    block_k = 64
    block_n = 64
    decode_block_k = 256  # inputs per step of a decode row's shrink (`row_decode`)
    decode_block_n = 128  # outputs per decode program
    tables_kept = 64

    def __init__(self, kernels: ModuleType) -> None:
        self._k = kernels
        self._tables: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._tables_lock = threading.Lock()

    def table(
        self, key: Hashable, values: Callable[[], Sequence[int]], device: torch.device
    ) -> torch.Tensor:
        """The int32 routing table ``values()`` on ``device``, uploaded once per ``key``
        (the last ``tables_kept`` are kept). The plans of one routing, one per adapted
        projection, mostly carry the same table: one host-to-device copy per step instead
        of one per projection (each copy costs the host more than a kernel launch).
        Plans only read their tables."""
        with self._tables_lock:
            found = self._tables.get((key, device))
            if found is not None:
                self._tables.move_to_end((key, device))
                return found
        made = torch.tensor(list(values()), dtype=torch.int32, device=device)
        with self._tables_lock:
            self._tables[(key, device)] = made
            while len(self._tables) > self.tables_kept:
                self._tables.popitem(last=False)
        return made

    def __call__(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        slots: torch.Tensor,
        ranks: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        block_r: int,
    ) -> None:
        rows, (n, n_in), n_out = slots.shape[0], x.shape, y.shape[1]
        tokens = n // rows
        if tokens == 1:  # decode: the kernel made for one token per row
            self._k.row_decode[(rows, -(-n_out // self.decode_block_n))](
                x, a, b, slots, ranks, y, n_in, n_out,
                x.stride(0), a.stride(0), a.stride(1), a.stride(2),
                b.stride(0), b.stride(1), b.stride(2), y.stride(0),
                BLOCK_R=block_r, BLOCK_K=self.decode_block_k, BLOCK_N=self.decode_block_n,
            )  # fmt: skip
            return
        grid = (rows, -(-tokens // self.block_t), -(-n_out // self.block_n))
        self._k.row_update[grid](
            x, a, b, slots, ranks, y, tokens, n_in, n_out,
            x.stride(0), a.stride(0), a.stride(1), a.stride(2),
            b.stride(0), b.stride(1), b.stride(2), y.stride(0),
            BLOCK_T=self.block_t, BLOCK_R=block_r, BLOCK_K=self.block_k,
            BLOCK_N=self.block_n, IEEE=x.dtype == torch.float32,
        )  # fmt: skip

    def decode_group(
        self,
        x: torch.Tensor,
        slots: torch.Tensor,
        members: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
        block_r: int,
    ) -> None:
        """The decode deltas of 2 or 3 sibling projections in one launch: for each member
        ``(d, ranks, a, b)``, ``d[n] = (x[n] @ A[s]) @ B[s]`` with ``s = slots[n]`` (0 for
        a row with slot -1 or a slot of rank 0 there). ``x: [B, in]`` one token per row,
        ``d: [B, out]`` (each member its own ``out``), the rest as for a call."""
        if not 2 <= len(members) <= 3:
            raise ValueError(f"a decode group has 2 or 3 members, not {len(members)}")
        tiles = [-(-d.shape[1] // self.decode_block_n) for d, _, _, _ in members]
        args: list[object] = []
        for d, ranks, a, b in [*members, members[-1]][:3]:
            args += [a, b, ranks, d, d.shape[1], *a.stride(), *b.stride(), d.stride(0)]
        self._k.row_decode_group[(slots.shape[0], sum(tiles))](
            x, slots, *args, x.shape[1], x.stride(0), tiles[0], tiles[1],
            MEMBERS=len(members), BLOCK_R=block_r, BLOCK_K=self.decode_block_k,
            BLOCK_N=self.decode_block_n,
        )  # fmt: skip

    def segments(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        tiles: torch.Tensor,
        ranks: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        block_r: int,
    ) -> None:
        """The segment form: ``y[lo:hi] += (x[lo:hi] @ A[s]) @ B[s]`` for every tile
        ``(lo, hi, s)`` of ``tiles: [3, P]`` int32 on the device (``segment_tiles``: at
        most ``block_t`` tokens each, slots of rank > 0); other rows are left as they are.
        ``y``, ``x``, ``ranks``, ``a``, ``b`` and ``block_r`` as for a call."""
        n_tiles, (n_in, n_out) = tiles.shape[1], (x.shape[1], y.shape[1])
        if n_tiles == 0:
            return
        grid = (n_tiles, -(-n_out // self.block_n))
        self._k.segment_update[grid](
            x, a, b, tiles, ranks, y, n_tiles, n_in, n_out,
            x.stride(0), a.stride(0), a.stride(1), a.stride(2),
            b.stride(0), b.stride(1), b.stride(2), y.stride(0),
            BLOCK_T=self.block_t, BLOCK_R=block_r, BLOCK_K=self.block_k,
            BLOCK_N=self.block_n, IEEE=x.dtype == torch.float32,
        )  # fmt: skip


def segment_tiles(segments: Segments, ranks: Sequence[int], block_t: int) -> list[list[int]]:
    """The kernel's tiles for a segment routing: every segment whose slot has rank > 0 in
    ``ranks`` cut into pieces of at most ``block_t`` tokens, as ``[firsts, ends, slots]``."""
    pieces = [p for p in segments.pieces(block_t) if p[2] != NO_SLOT and ranks[p[2]] > 0]
    return [[p[i] for p in pieces] for i in range(3)]


def block_rank(rank: int) -> int:
    """The kernel's rank tile for ranks up to ``rank``: a power of two, at least 16."""
    return max(16, 1 << max(0, rank - 1).bit_length())


def reference(
    x: torch.Tensor, slots: list[int], ranks: list[int], a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """The update the kernel adds, per row in float64 (for tests and the self-test)."""
    tokens = x.shape[0] // len(slots)
    out = torch.zeros(x.shape[0], b.shape[2], dtype=torch.float64, device=x.device)
    for row, s in enumerate(slots):
        if s >= 0 and ranks[s] > 0:
            r, span = ranks[s], slice(row * tokens, (row + 1) * tokens)
            out[span] = x[span].double() @ a[s, :, :r].double() @ b[s, :r].double()
    return out


def self_test(kernel: TritonRowKernel, device: torch.device, dtype: torch.dtype) -> None:
    """Run the kernel on a small mixed routing (two ranks, a row without an adapter, a
    slot of rank 0, two tokens per row) on ``device`` and compare with ``reference``, and
    its segment form on mixed segments against ``segment_delta``; raises
    ``AssertionError`` on a mismatch."""
    gen = torch.Generator().manual_seed(0)
    ranks, slots = [4, 0, 9], [0, -1, 2, 1]
    a = torch.randn(3, 40, 9, generator=gen).to(device, dtype)
    b = torch.randn(3, 9, 70, generator=gen).to(device, dtype)
    x = torch.randn(8, 40, generator=gen).to(device, dtype)
    y = torch.randn(8, 70, generator=gen).to(device, dtype)
    expected = y.double() + reference(x, slots, ranks, a, b)
    as_device = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    kernel(y, x, as_device(slots), as_device(ranks), a, b, block_rank(max(ranks)))
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol * 10)
    # the segment form on the same bank: a 19-token segment (two tiles), a base segment,
    # an empty one, a slot of rank 0 and a 1-token segment
    segments = Segments.from_lengths([19, 2, 0, 3, 1], [2, -1, 0, 1, 0])
    x = torch.randn(segments.total, 40, generator=gen).to(device, dtype)
    y = torch.randn(segments.total, 70, generator=gen).to(device, dtype)
    expected = y.double() + segment_delta(x, segments, a, b, ranks)
    tiles = as_device(segment_tiles(segments, ranks, kernel.block_t))
    kernel.segments(y, x, tiles, as_device(ranks), a, b, block_rank(max(ranks)))
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol * 10)


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
        from flora.serving.backends import _row_kernel_triton

        kernel = TritonRowKernel(_row_kernel_triton)
        self_test(kernel, device, dtype)
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


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[tokens, in]`` with unit stride on the last dim (what the kernels read)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


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
        x2 = _token_rows(x)
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
        x2 = _token_rows(x)
        self.kernel.segments(
            y.view(-1, y.shape[-1]), x2, self.tiles, self.ranks, self.a, self.b, self.block_r
        )
        return y


class _TritonGraphPlan:
    """``_TritonPlan`` for CUDA graphs: the row slots are read from the caller's buffer
    (refilled in place between replays) and every slot counts as the bank's full rank
    capacity (its padding is zero, so the result is exact, and a slot loaded later needs
    no new plan as long as the bank is not re-allocated)."""

    __slots__ = ("a", "b", "base", "block_r", "kernel", "ranks", "slots", "target")

    def __init__(self, target: RowTarget, kernel: TritonRowKernel, slots: torch.Tensor) -> None:
        bank = target.bank
        self.base, self.kernel, self.a, self.b = target.base_forward, kernel, bank.a, bank.b
        self.slots, self.target = slots, target
        self.ranks = torch.full(
            (bank.max_slots + 1,), bank.capacity, dtype=torch.int32, device=bank.device
        )
        self.block_r = block_rank(bank.capacity)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        x2 = _token_rows(x)
        self.kernel(
            y.view(-1, y.shape[-1]), x2, self.slots, self.ranks, self.a, self.b, self.block_r
        )
        return y


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

    def delta(self, x: torch.Tensor, x2: torch.Tensor, member: int) -> torch.Tensor:
        def launch() -> list[torch.Tensor]:
            outs = [x2.new_empty(x2.shape[0], p.target.weight.shape[0]) for p in self.plans]
            members = [(d, p.ranks, p.a, p.b) for d, p in zip(outs, self.plans, strict=True)]
            self.kernel.decode_group(x2, self.slots, members, self.block_r)
            return outs

        deltas: list[torch.Tensor] = self.shared.take(x, member, launch)
        return deltas[member]


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
        x2 = _token_rows(x)
        if x2.shape[0] != self.rows:
            return self.alone(x)
        d = self.group.delta(x, x2, self.member)
        return torch.addmm(d, x2, self.weight_t).view(*x.shape[:-1], d.shape[1])


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
        one ``_DecodeGroup`` (one launch a decode step instead of one per member); other
        plans are left as they are."""
        live = [p for p in plans if isinstance(p, _TritonGraphPlan)]
        if not 2 <= len(live) <= 3 or len(live) != len(plans):
            return list(plans)
        targets = [p.target for p in live]
        same = {(t.weight.shape[1], t.weight.dtype, t.weight.device) for t in targets}
        if len(same) != 1 or any(t.base_bias is not None for t in targets):
            return list(plans)
        group = _DecodeGroup(live)
        return [_GroupMemberPlan(group, m, p) for m, p in enumerate(live)]
