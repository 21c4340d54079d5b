"""The Triton adapter kernels' launchers (``TritonRowKernel``), their float64 references
and the self-test that the capability check (``triton_gpu``) runs on a device.

``TritonRowKernel`` launches the kernels of ``KERNEL_MODULES``: ``_row_kernel_triton``
(a per-row or per-segment low-rank update, SGMV/BGMV style, and the decode forms, one
projection or a sibling group) and ``_prologue_triton`` (the decode deltas computed
inside the RMSNorm or SiLU-multiply that produces the projections' input).
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from types import ModuleType
from typing import Any, NamedTuple

import torch

from flora.serving.base import NO_SLOT
from flora.serving.segments import Segments, segment_delta

__all__ = [
    "KERNEL_MODULES",
    "Member",
    "TritonRowKernel",
    "block_rank",
    "load_row_kernel",
    "member_arg",
    "reference",
    "reference_rms_norm",
    "reference_silu_mul",
    "segment_tiles",
    "self_test",
    "self_test_prologues",
    "token_rows",
]


class Member(NamedTuple):
    """A projection whose decode delta a kernel writes: ``d[n] = (x[n] @ A[s]) @ B[s]``
    (0 for a row without a slot, or a slot of rank 0 in ``ranks``), plus ``bias`` where
    given. ``d: [B, out]`` with unit stride along ``out`` is what the projection's GEMM
    then adds to ``x @ W^T`` (``addmm``), so a biased projection's bias rides in it;
    ``bias: [out]``."""

    d: torch.Tensor
    ranks: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    bias: torch.Tensor | None = None


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

    def __init__(self, kernels: ModuleType, prologues: ModuleType | None = None) -> None:
        self._k = kernels
        # ``_prologue_triton`` (the deltas inside a norm or SiLU-multiply), or None where
        # its self-test failed: the methods using it are then not available
        self.prologues = prologues
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
        self._tiles(self._k.row_update, grid, y, x, slots, tokens, ranks, a, b, block_r)

    def decode_group(
        self,
        x: torch.Tensor,
        slots: torch.Tensor,
        members: Sequence[Member],
        block_r: int,
    ) -> None:
        """The decode deltas of 2 or 3 sibling projections in one launch: for each
        ``Member``, ``d[n] = (x[n] @ A[s]) @ B[s] (+ bias)`` with ``s = slots[n]``.
        ``x: [B, in]`` one token per row, ``d: [B, out]`` (each member its own ``out``),
        the rest as for a call."""
        tiles, args = self._group_args(members)
        self._k.row_decode_group[(slots.shape[0], sum(tiles))](
            x, slots, *args, x.shape[1], x.stride(0), tiles[0], tiles[1],
            MEMBERS=len(members), BLOCK_R=block_r, BLOCK_K=self.decode_block_k,
            BLOCK_N=self.decode_block_n,
        )  # fmt: skip

    def _group_args(self, members: Sequence[Member]) -> tuple[list[int], list[tuple[object, ...]]]:
        """A group kernel's output tiles per member and its three member arguments (a third
        repeats the last when there are two, never read)."""
        if not 2 <= len(members) <= 3:
            raise ValueError(f"a decode group has 2 or 3 members, not {len(members)}")
        tiles = [-(-m.d.shape[1] // self.decode_block_n) for m in members]
        return tiles, [member_arg(m) for m in [*members, members[-1]][:3]]

    def norm_decode_group(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        y: torch.Tensor,
        slots: torch.Tensor,
        members: Sequence[Member],
        block_r: int,
    ) -> None:
        """``y = RMSNorm(x)`` (the Llama formula: float32 statistics, the cast to ``x``'s
        dtype, then the weight) and the decode deltas of ``y`` for 2 or 3 siblings, in one
        launch (``_prologue_triton.norm_decode_group``). ``x``, ``y``: ``[B, in]`` with unit
        stride along ``in``; ``weight``: ``[in]``; the rest as for ``decode_group``."""
        if self.prologues is None:
            raise RuntimeError("this kernel has no prologue kernels")
        tiles, args = self._group_args(members)
        n_in = x.shape[1]
        self.prologues.norm_decode_group[(slots.shape[0], sum(tiles))](
            x, weight, y, slots, *args, n_in, x.stride(0), y.stride(0), eps, tiles[0],
            tiles[1], MEMBERS=len(members), BLOCK_R=block_r, BLOCK_K=self.decode_block_k,
            BLOCK_N=self.decode_block_n, BLOCK_C=max(16, 1 << (n_in - 1).bit_length()),
        )  # fmt: skip

    def act_decode(
        self,
        gate: torch.Tensor,
        up: torch.Tensor,
        act: torch.Tensor,
        slots: torch.Tensor,
        member: Member,
        block_r: int,
    ) -> None:
        """``act = SiLU(gate) * up`` (as torch rounds ``act_fn(gate) * up``) and, for the
        projection that reads it, ``member``'s ``d[n] = (act[n] @ A[s]) @ B[s] (+ bias)``,
        in one launch. ``gate``, ``up``, ``act``:
        ``[B, in]`` with unit stride along ``in``; the rest as for ``decode_group``."""
        if self.prologues is None:
            raise RuntimeError("this kernel has no prologue kernels")
        tiles = -(-member.d.shape[1] // self.decode_block_n)
        self.prologues.act_decode[(slots.shape[0], tiles)](
            gate, up, act, slots, member_arg(member), gate.shape[1],
            gate.stride(0), up.stride(0), act.stride(0),
            BLOCK_R=block_r, BLOCK_K=self.decode_block_k, BLOCK_N=self.decode_block_n,
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
        n_tiles = tiles.shape[1]
        if n_tiles == 0:
            return
        grid = (n_tiles, -(-y.shape[1] // self.block_n))
        self._tiles(self._k.segment_update, grid, y, x, tiles, n_tiles, ranks, a, b, block_r)

    def _tiles(
        self,
        kernel: Any,
        grid: tuple[int, ...],
        y: torch.Tensor,
        x: torch.Tensor,
        routing: torch.Tensor,
        count: int,
        ranks: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        block_r: int,
    ) -> None:
        """A launch of a tile kernel (``row_update``: ``routing`` the rows' slots, ``count``
        tokens a row; ``segment_update``: the tiles and their count), ``tl.dot`` over
        ``block_t`` tokens a program."""
        kernel[grid](
            x, a, b, routing, ranks, y, count, x.shape[1], y.shape[1],
            x.stride(0), *a.stride(), *b.stride(), y.stride(0),
            BLOCK_T=self.block_t, BLOCK_R=block_r, BLOCK_K=self.block_k,
            BLOCK_N=self.block_n, IEEE=x.dtype == torch.float32,
        )  # fmt: skip


def member_arg(member: Member) -> tuple[object, ...]:
    """A decode kernel's argument for ``member``: bank A, bank B, ranks, the delta buffer,
    its width, A's and B's strides, ``d``'s row stride and the bias (contiguous) or
    ``None`` (the order the kernels' ``_decode_delta`` and ``_prologue_member`` unpack)."""
    d, ranks, a, b, bias = member
    if bias is not None:
        if bias.shape != (d.shape[1],):
            raise ValueError(f"a bias of {tuple(bias.shape)} for {d.shape[1]} outputs")
        bias = bias.contiguous()
    return (a, b, ranks, d, d.shape[1], *a.stride(), *b.stride(), d.stride(0), bias)


def token_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[tokens, in]`` with unit stride on the last dim (what the kernels read)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


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


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm in torch ops (what ``norm_decode_group`` writes)."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed


def reference_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``act_fn(gate) * up`` of a SiLU MLP in torch ops (what ``act_decode`` writes)."""
    return torch.nn.functional.silu(gate) * up


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


def self_test_prologues(kernel: TritonRowKernel, device: torch.device, dtype: torch.dtype) -> None:
    """Run the prologue kernels on ``device`` (the norm's output and the deltas of 2
    members, the second holding no slot and a bias; SiLU-multiply's product and its delta
    plus a bias; a row without an adapter) and compare with the references; raises
    ``AssertionError`` on a mismatch."""
    gen = torch.Generator().manual_seed(1)
    ranks, slots = [4, 0, 9], [0, -1, 2, 1]
    a = torch.randn(3, 40, 9, generator=gen).to(device, dtype)
    b = torch.randn(3, 9, 70, generator=gen).to(device, dtype)
    bias = torch.randn(70, generator=gen).to(device, dtype)
    as_device = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    x, w = torch.randn(4, 40, generator=gen).to(device, dtype), a[0, :, 0] + 1
    y = torch.empty_like(x)
    members = [
        Member(torch.empty(4, 70, dtype=dtype, device=device), as_device(r), a, b, bias_)
        for r, bias_ in ((ranks, None), ([0, 0, 0], bias))
    ]
    kernel.norm_decode_group(x, w, 1e-5, y, as_device(slots), members, block_rank(9))
    want = reference_rms_norm(x, w, 1e-5)
    torch.testing.assert_close(y, want, rtol=tol, atol=tol)
    delta = reference(y, slots, ranks, a, b)
    torch.testing.assert_close(members[0].d.double(), delta, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(members[1].d, bias.expand(4, -1), rtol=0, atol=0)
    gate, up = (torch.randn(4, 40, generator=gen).to(device, dtype) for _ in range(2))
    act, d = torch.empty_like(gate), torch.empty(4, 70, dtype=dtype, device=device)
    member = Member(d, as_device(ranks), a, b, bias)
    kernel.act_decode(gate, up, act, as_device(slots), member, block_rank(9))
    torch.testing.assert_close(act, reference_silu_mul(gate, up), rtol=tol, atol=tol)
    delta = reference(act, slots, ranks, a, b) + bias.double()
    torch.testing.assert_close(d.double(), delta, rtol=tol, atol=tol * 10)


# The Triton modules of the adapter kernels: the row kernels, and the prologue kernels
# that call into them (and whose row formulas the engine's fused kernels call).
KERNEL_MODULES = (
    "flora.serving.backends._row_kernel_triton",
    "flora.serving.backends._prologue_triton",
)


def load_row_kernel() -> TritonRowKernel:
    """The kernel over ``KERNEL_MODULES`` as imported now (compiled, or under Triton's
    interpreter where ``TRITON_INTERPRET=1`` was set when they were first imported)."""
    row, prologue = (importlib.import_module(name) for name in KERNEL_MODULES)
    return TritonRowKernel(row, prologue)
