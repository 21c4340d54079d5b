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
routing, ``_TritonSegmentPlan`` per packed step, and under CUDA graphs the plans of
``triton_graph``: ``TritonGraphPlan`` and the sibling groups, with the decode deltas
computed inside the kernel that produces the projections' input).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from flora.serving.backends.base import Backend, RowTarget
from flora.serving.backends.torch_paths import torch_plan, torch_segment_plan
from flora.serving.backends.triton_graph import (
    ODelta,
    TritonGraphPlan,
    attention_o_delta,
    rms_norm_with_deltas,
    share_graph_plans,
    silu_mul_with_delta,
)
from flora.serving.backends.triton_kernel import (
    KERNEL_MODULES,
    Member,
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
    "Member",
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
        return TritonGraphPlan(target, self.kernel, slots)

    def share(self, plans: Sequence[Plan | None]) -> list[Plan | None]:
        return share_graph_plans(plans)
