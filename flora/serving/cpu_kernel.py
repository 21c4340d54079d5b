"""A fused per-row low-rank kernel for float32 CPU serving (BGMV-style), via numba.

Why: on a CPU a decode step is about 200 small matmuls, and the torch formulations of a
mixed-adapter update all pay for something the maths does not need. "wide" multiplies
every row by every distinct adapter's columns (K times the rank-``r`` work), "rows" reads
a per-row copy of the factors, and grouping rows by adapter turns each projection into
``2 K`` tiny BLAS calls at several microseconds each. This kernel does what a GPU
BGMV kernel does: one call per group of sibling projections (q/k/v, gate/up) or per
projection, each row reads its own slot's factors in place (``A`` stored transposed,
``(S, R, n_in)``) and does exactly its rank's work; rows run in parallel.
``bench/kernels.py`` measures it against the torch paths.

``kernel_for()`` / ``row_kernel()`` are the capability check: ``None`` where the kernel
does not apply or would not pay (the torch paths then serve every routing, and they stay
the reference the kernel is tested against).
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np
import torch

__all__ = ["RowKernel", "kernel_for", "row_kernel"]


class RowKernel:
    """``kernel(x, row_slots, ats, bs, ranks, ds)``: for each member ``j`` (up to 3
    projections reading the same input), ``d_j[n] = (x[n] @ A_j[s]) @ B_j[s]``.

    ``x: [N, n_in]`` is a contiguous float32 CPU tensor whose ``N`` rows are ``B`` batch
    rows of ``N / B`` tokens each (decode: one token); ``row_slots: [B]`` int32 (-1: no
    adapter, ``d`` row zero); per member, ``at: [S, R, n_in]``, ``b: [S, R, n_out]``
    (float32, or bfloat16 bits as int16) and ``ranks: [S]`` (int32) are numpy views of a
    rank-major
    ``DeviceSlotBank``, read in place, and ``d: [N, n_out]`` is a contiguous float32
    tensor the kernel overwrites. The caller then adds the base in one GEMM
    (``d.addmm_(x, W^T)``), so ``y`` is written once.

    Calls are serialised by a lock: two engines in one process (each running forwards on
    its own worker thread) would otherwise each start a team of threads on the same cores.
    """

    def __init__(self, fn: Any, set_threads: Any) -> None:
        self._fn = fn
        self._set_threads = set_threads
        self._lock = threading.Lock()
        self._local = threading.local()  # numba's thread count is per calling thread

    def __call__(
        self,
        x: torch.Tensor,
        row_slots: np.ndarray,
        ats: tuple[np.ndarray, ...],
        bs: tuple[np.ndarray, ...],
        ranks: tuple[np.ndarray, ...],
        ds: tuple[torch.Tensor, ...],
    ) -> None:
        threads = torch.get_num_threads()  # follow torch's intra-op setting
        if getattr(self._local, "threads", None) != threads:
            self._set_threads(threads)
            self._local.threads = threads
        tokens = x.shape[0] // row_slots.shape[0]
        outs = tuple(d.numpy() for d in ds)
        with self._lock:
            self._fn(x.numpy(), row_slots, tokens, ats, bs, ranks, outs)


@functools.cache
def row_kernel() -> RowKernel | None:
    """The compiled kernel, or ``None`` when it would not pay: numba missing or failing to
    compile here, or only numba's "workqueue" thread pool available (no OpenMP or TBB
    runtime: measured 10x slower per call than with OpenMP, see docs/performance.md).

    Compiled on first use (about 5 s) and cached on disk by numba (about 1.5 s to load).
    """
    try:
        import numba

        from flora.serving._row_kernel_numba import row_deltas
    except Exception:  # ImportError, or numba failing to compile for this CPU
        return None
    limit = numba.config.NUMBA_NUM_THREADS
    kernel = RowKernel(row_deltas, lambda n: numba.set_num_threads(max(1, min(n, limit))))
    unit = np.ones((1, 1, 1), dtype=np.float32)
    kernel(
        torch.ones(1, 1),
        np.zeros(1, np.int32),
        (unit,),
        (unit,),
        (np.ones(1, np.int32),),
        (torch.empty(1, 1),),
    )
    if numba.threading_layer() == "workqueue":
        return None
    return kernel


def kernel_for(enabled: bool, device: torch.device, dtype: torch.dtype) -> RowKernel | None:
    """The kernel for a module of ``dtype`` on ``device`` when the policy ``enabled`` it:
    float32 on the CPU only, and only where ``row_kernel()`` is available."""
    if enabled and device.type == "cpu" and dtype == torch.float32:
        return row_kernel()
    return None
