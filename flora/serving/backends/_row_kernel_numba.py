"""The numba-compiled body of ``flora.serving.backends.numba_cpu`` (imported only through it).

Kept in its own module so that ``numba`` is imported lazily and the compiled function can
be cached on disk (numba caches module-level functions only).
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic


@intrinsic
def _widen(typingctx, v):  # pragma: no cover (compiled)
    """A factor element as float32: float32 as is; int16 holds bfloat16 bits (the high
    half of a float32), widened exactly by a shift (vectorised by LLVM)."""
    if v == types.float32:
        return types.float32(v), lambda context, builder, sig, args: args[0]
    if v == types.int16:

        def codegen(context, builder, sig, args):
            wide = builder.zext(args[0], ir.IntType(32))
            bits = builder.shl(wide, ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(bits, ir.FloatType())

        return types.float32(v), codegen
    return None


_F2 = nb.float32[:, ::1]
_I1 = nb.int32[::1]
# One compiled version per member count (1: o, down; 2: gate/up; 3: q/k/v) and factor
# storage (float32, or bfloat16 bits as int16).
_SIGNATURES = [
    nb.void(
        _F2,  # x: [N, n_in]
        _I1,  # row_slots: [B], slot of each batch row, -1 = none
        nb.int64,  # tokens: N // B consecutive rows of x per batch row
        nb.types.UniTuple(factor[:, :, ::1], m),  # at per member: [S, R, n_in] (A^T)
        nb.types.UniTuple(factor[:, :, ::1], m),  # b per member: [S, R, n_out]
        nb.types.UniTuple(_I1, m),  # ranks per member: [S] (<= R; 0 = slot not loaded)
        nb.types.UniTuple(_F2, m),  # d per member: [N, n_out], written
    )
    for factor in (nb.float32, nb.int16)
    for m in (1, 2, 3)
]


@nb.njit(_SIGNATURES, parallel=True, fastmath=True, nogil=True, cache=True, boundscheck=False)
def row_deltas(x, row_slots, tokens, ats, bs, ranks, ds):  # pragma: no cover (compiled)
    """``d_j[n] = (x[n] @ A_j[s]) @ B_j[s]`` with ``s = row_slots[n // tokens]`` for every
    member ``j`` (projections that read the same ``x``), rows in parallel; rows without a
    slot get zeros. Accumulates in float32 whatever the factor storage.

    The shrink is ``r`` dot products of length ``n_in`` (A is stored transposed, so each is
    one contiguous vectorised reduction); the expand is ``r`` vectorised AXPYs into the
    row of ``d``. Only the slot's own rank is computed, so mixed ranks cost what they say.
    """
    n_rows, n_in = x.shape
    cap = 1
    for j in range(len(ats)):
        cap = max(cap, ats[j].shape[1])
    for n in nb.prange(n_rows):
        s = row_slots[n // tokens]
        h = np.empty(cap, dtype=np.float32)
        for j in range(len(ats)):
            at, b, d = ats[j], bs[j], ds[j]
            n_out = d.shape[1]
            for o in range(n_out):
                d[n, o] = 0.0
            if s < 0:
                continue
            rank = ranks[j][s]
            for r in range(rank):
                acc = np.float32(0.0)
                for i in range(n_in):
                    acc += x[n, i] * _widen(at[s, r, i])
                h[r] = acc
            for r in range(rank):
                hr = h[r]
                for o in range(n_out):
                    d[n, o] += hr * _widen(b[s, r, o])


_SEGMENT_SIGNATURES = [
    nb.void(
        _F2,  # x: [N, n_in]
        _I1,  # item_lo: [W] first token of each work item
        _I1,  # item_hi: [W] end token (exclusive)
        _I1,  # item_slot: [W] the item's segment's slot, -1 = none
        nb.types.UniTuple(factor[:, :, ::1], m),  # at per member: [S, R, n_in] (A^T)
        nb.types.UniTuple(factor[:, :, ::1], m),  # b per member: [S, R, n_out]
        nb.types.UniTuple(_I1, m),  # ranks per member: [S]
        nb.types.UniTuple(_F2, m),  # d per member: [N, n_out], written on the items' rows
    )
    for factor in (nb.float32, nb.int16)
    for m in (1, 2, 3)
]


@nb.njit(
    _SEGMENT_SIGNATURES, parallel=True, fastmath=True, nogil=True, cache=True, boundscheck=False
)
def segment_deltas(x, item_lo, item_hi, item_slot, ats, bs, ranks, ds):  # pragma: no cover
    """``d_j[t] = (x[t] @ A_j[s]) @ B_j[s]`` for the tokens ``t`` of every work item (a
    piece of one segment, slot ``s``) and every member ``j``, items in parallel; items
    without a slot get zeros; rows of ``d`` outside every item are not touched.

    Per item, the shrink runs rank by rank over the item's tokens, so each row of ``A_s``
    (contiguous, ``n_in`` long) is read once per item and stays in cache while every token
    takes its dot product with it; the expand then adds ``h[t, r] * B_s[r]`` rows. Float32
    accumulation whatever the factor storage.
    """
    n_in = x.shape[1]
    cap = 1
    longest = 1
    for i in range(item_lo.shape[0]):
        longest = max(longest, item_hi[i] - item_lo[i])
    for j in range(len(ats)):
        cap = max(cap, ats[j].shape[1])
    for i in nb.prange(item_lo.shape[0]):
        lo, hi, s = item_lo[i], item_hi[i], item_slot[i]
        h = np.empty((longest, cap), dtype=np.float32)
        for j in range(len(ats)):
            at, b, d = ats[j], bs[j], ds[j]
            n_out = d.shape[1]
            for t in range(lo, hi):
                for o in range(n_out):
                    d[t, o] = 0.0
            if s < 0:
                continue
            rank = ranks[j][s]
            for r in range(rank):
                for t in range(lo, hi):
                    acc = np.float32(0.0)
                    for k in range(n_in):
                        acc += x[t, k] * _widen(at[s, r, k])
                    h[t - lo, r] = acc
            for t in range(lo, hi):
                for r in range(rank):
                    hr = h[t - lo, r]
                    for o in range(n_out):
                        d[t, o] += hr * _widen(b[s, r, o])
