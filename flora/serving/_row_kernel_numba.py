"""The numba-compiled body of ``flora.serving.cpu_kernel`` (imported only through it).

Kept in its own module so that ``numba`` is imported lazily and the compiled function can
be cached on disk (numba caches module-level functions only).
"""

from __future__ import annotations

import numba as nb
import numpy as np

_SIGNATURE = nb.void(
    nb.float32[:, ::1],  # x: [N, n_in]
    nb.float32[:, ::1],  # y: [N, n_out], updated in place
    nb.int32[::1],  # row_slots: [B], slot of each batch row, -1 = none
    nb.int64,  # tokens: N // B consecutive rows of x per batch row
    nb.float32[:, :, ::1],  # at: [S, R, n_in], A transposed per slot
    nb.float32[:, :, ::1],  # b: [S, R, n_out]
    nb.int32[::1],  # ranks: [S], rank of each slot (<= R; 0 = empty)
)


@nb.njit(_SIGNATURE, parallel=True, fastmath=True, nogil=True, cache=True, boundscheck=False)
def add_row_lowrank(x, y, row_slots, tokens, at, b, ranks):  # pragma: no cover (compiled)
    """``y[n] += (x[n] @ A[s]) @ B[s]`` with ``s = row_slots[n // tokens]``, rows in parallel.

    The shrink is ``r`` dot products of length ``n_in`` (A is stored transposed, so each is
    one contiguous vectorised reduction); the expand is ``r`` vectorised AXPYs into the
    row of ``y``. Only the slot's own rank is computed, so mixed ranks cost what they say.
    """
    n_rows, n_in = x.shape
    n_out = y.shape[1]
    cap = at.shape[1]
    for n in nb.prange(n_rows):
        s = row_slots[n // tokens]
        if s < 0:
            continue
        rank = ranks[s]
        h = np.empty(cap, dtype=np.float32)
        for r in range(rank):
            acc = np.float32(0.0)
            for i in range(n_in):
                acc += x[n, i] * at[s, r, i]
            h[r] = acc
        for r in range(rank):
            hr = h[r]
            for o in range(n_out):
                y[n, o] += hr * b[s, r, o]
