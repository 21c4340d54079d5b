"""A fused per-row low-rank kernel for float32 CPU serving (BGMV-style), via numba.

Why: on a CPU a decode step is about 200 small matmuls, and the torch formulations of a
mixed-adapter update all pay for something the maths does not need. "wide" multiplies
every row by every distinct adapter's columns (K times the rank-``r`` work), "rows" reads
a per-row copy of the factors, and grouping rows by adapter turns each projection into
``2 K`` tiny BLAS calls at several microseconds each. This kernel does what a GPU
BGMV kernel does: one call per projection, each row reads its own slot's factors in
place (``A`` stored transposed, ``(S, R, n_in)``) and does exactly its rank's work; rows
run in parallel. ``bench/kernels.py`` measures it against the torch paths.

``row_kernel()`` is the capability check: ``None`` when numba cannot be imported (the
torch paths then serve every routing, and they stay the reference the kernel is tested
against).
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np
import torch

__all__ = ["RowKernel", "row_kernel"]


class RowKernel:
    """``kernel(x, y, row_slots, at, b, ranks)``: ``y[n] += (x[n] @ A[s]) @ B[s]`` in place.

    ``x: [N, n_in]`` and ``y: [N, n_out]`` are contiguous float32 CPU tensors whose ``N``
    rows are ``B`` batch rows of ``N / B`` tokens each (decode: one token, prefill: the
    padded prompt); ``row_slots: [B]`` int32 (-1: leave the row alone); ``at: [S, R,
    n_in]`` and ``b: [S, R, n_out]`` float32 and ``ranks: [S]`` int32 are numpy views of a
    ``DeviceSlotBank`` (rank-major storage), read in place.

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
        y: torch.Tensor,
        row_slots: np.ndarray,
        at: np.ndarray,
        b: np.ndarray,
        ranks: np.ndarray,
    ) -> None:
        threads = torch.get_num_threads()  # follow torch's intra-op setting
        if getattr(self._local, "threads", None) != threads:
            self._set_threads(threads)
            self._local.threads = threads
        tokens = x.shape[0] // row_slots.shape[0]
        with self._lock:
            self._fn(x.numpy(), y.numpy(), row_slots, tokens, at, b, ranks)


@functools.cache
def row_kernel() -> RowKernel | None:
    """The compiled kernel, or ``None`` when it would not pay: numba missing or failing to
    compile here, or only numba's "workqueue" thread pool available (no OpenMP or TBB
    runtime: measured 10x slower per call than with OpenMP, see docs/performance.md).

    Compiled on first use (about a second) and cached on disk by numba.
    """
    try:
        import numba

        from flora.serving._row_kernel_numba import add_row_lowrank
    except Exception:  # ImportError, or numba failing to compile for this CPU
        return None
    limit = numba.config.NUMBA_NUM_THREADS
    kernel = RowKernel(add_row_lowrank, lambda n: numba.set_num_threads(max(1, min(n, limit))))
    one = torch.ones(1, 1)
    unit = np.ones((1, 1, 1), dtype=np.float32)
    kernel(one, one.clone(), np.zeros(1, np.int32), unit, unit, np.ones(1, np.int32))
    if numba.threading_layer() == "workqueue":
        return None
    return kernel
