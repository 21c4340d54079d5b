"""Triton body of ``flora.serving.backends.triton_gpu`` (imported only through it, where triton is
installed): a per-row low-rank update in one launch, SGMV/BGMV style.

Every batch row is a segment of ``tokens`` consecutive rows of ``x`` that share one slot.
A program takes a tile of one segment's tokens and a tile of the outputs: it computes
``h = x @ A_s`` for its tokens (``tl.dot`` over ``n_in`` in ``BLOCK_K`` steps, float32
accumulation) and adds ``h @ B_s`` into its tile of ``y``. The programs of one row's output
tiles each redo the small shrink (rank <= 64: a few KB of factors from cache), which buys
one launch per projection instead of two and no ``h`` buffer. Factors are read in place
from the bank, only up to the slot's own rank (masked loads), and a row without a slot
(rank 0) does nothing. Decode is one token per segment (BGMV); prefill tiles a segment's
tokens (SGMV). ``row_decode`` is the decode case on its own (one token per row): without
``tl.dot``, whose tiles are at least 16 tokens, so a program does one row's shrink in a
few wide steps instead of many narrow ones (latency, not arithmetic, bounds a decode
step's launches). ``row_decode_group`` is the decode case for 2 or 3 sibling projections
that read the same input (q/k/v, gate/up) in one launch, writing each member's delta for
its base GEMM to add. ``segment_update`` is the same computation over tiles of token
segments of any lengths (a packed step), each tile with its own slot.

Reductions are ``tl.reduce`` with triton's own sum combiner (``_add``), not ``tl.sum``,
and zeros ``tl.full``, not ``tl.zeros``: the helpers of ``triton.language.standard`` are
compiled when triton is imported, so Triton's interpreter (the CPU tests) could not run
them if triton was imported before it was on; it never runs the combiner itself, it
recognises it and sums in numpy (any other combiner it applies element by element in
Python, a hundred times slower).
"""

from __future__ import annotations

import triton
import triton.language as tl

_add = tl.standard._sum_combine  # a + b (see above)


@triton.jit
def rms_rstd(x_row, n_cols, eps, BLOCK: tl.constexpr):  # pragma: no cover (compiled)
    """``rsqrt(mean(x^2) + eps)`` of the row at ``x_row`` (unit stride), in float32."""
    c = tl.arange(0, BLOCK)
    xf = tl.load(x_row + c, mask=c < n_cols, other=0.0).to(tl.float32)
    return tl.rsqrt(tl.reduce(xf * xf, 0, _add) / n_cols + eps)


@triton.jit
def rms_normed(xs, ws, rstd):  # pragma: no cover (compiled)
    """The Llama / Mistral / Qwen RMSNorm of ``xs`` (part of a row whose ``rms_rstd`` is
    ``rstd``) with weights ``ws``, step by step: ``(xs * rstd)`` in float32, rounded to
    ``xs``'s dtype, times the weight in float32 (the caller rounds to the output's dtype)."""
    normed = (xs.to(tl.float32) * rstd).to(xs.dtype)
    return ws.to(tl.float32) * normed.to(tl.float32)


@triton.jit
def silu_mul(gs, us):  # pragma: no cover (compiled)
    """``SiLU(gs) * us`` as torch computes ``act_fn(gate) * up``: the SiLU in float32
    rounded to the inputs' dtype, then the product in float32 rounded again."""
    g = gs.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gs.dtype)
    return (act.to(tl.float32) * us.to(tl.float32)).to(gs.dtype)


@triton.jit
def _tile_update(  # pragma: no cover (compiled)
    x, a, b, y, s, rank, n, live_t, o, n_in, n_out, stride_xn, stride_as, stride_ak,
    stride_ar, stride_bs, stride_br, stride_bo, stride_yn, BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """``y[n, o] += (x[n] @ A_s) @ B_s[:, o]`` for a tile of tokens ``n`` (``live_t``) of
    one slot ``s`` of rank ``rank``: the shrink with ``tl.dot`` in ``BLOCK_K`` steps, the
    expand, the add, in float32 (exact products for float32 inputs: ``IEEE``)."""
    r = tl.arange(0, BLOCK_R)
    h = tl.full((BLOCK_T, BLOCK_R), 0.0, tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xs = tl.load(
            x + n[:, None] * stride_xn + k[None, :],
            mask=live_t[:, None] & (k < n_in)[None, :],
            other=0.0,
        )
        fs = tl.load(
            a + s * stride_as + k[:, None] * stride_ak + r[None, :] * stride_ar,
            mask=(k < n_in)[:, None] & (r < rank)[None, :],
            other=0.0,
        ).to(xs.dtype)
        if IEEE:
            h += tl.dot(xs, fs, input_precision="ieee")
        else:
            h += tl.dot(xs, fs)
    fb = tl.load(
        b + s * stride_bs + r[:, None] * stride_br + o[None, :] * stride_bo,
        mask=(r < rank)[:, None] & (o < n_out)[None, :],
        other=0.0,
    ).to(tl.float32)
    delta = tl.dot(h, fb, input_precision="ieee")
    where = y + n[:, None] * stride_yn + o[None, :]
    live = live_t[:, None] & (o < n_out)[None, :]
    out = tl.load(where, mask=live, other=0.0)
    tl.store(where, (out.to(tl.float32) + delta).to(out.dtype), mask=live)


@triton.jit
def row_update(  # pragma: no cover (compiled)
    x,  # [N, n_in], unit stride along n_in
    a,  # bank A: [S, n_in, R] (any strides)
    b,  # bank B: [S, R, n_out] (any strides)
    slots,  # [B] int32, -1 = no adapter
    ranks,  # [S] int32, 0 = slot not loaded here
    y,  # [N, n_out], unit stride along n_out: (x @ A_s) @ B_s is added in place
    tokens,
    n_in,
    n_out,
    stride_xn,
    stride_as,
    stride_ak,
    stride_ar,
    stride_bs,
    stride_br,
    stride_bo,
    stride_yn,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,  # float32 inputs: exact float32 products, not TF32
):
    row = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    o = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(slots + row)
    rank = tl.where(slot >= 0, tl.load(ranks + tl.maximum(slot, 0)), 0)
    if rank > 0:
        s = slot.to(tl.int64)
        n = row.to(tl.int64) * tokens + t
        live_t = t < tokens
        _tile_update(
            x, a, b, y, s, rank, n, live_t, o, n_in, n_out, stride_xn, stride_as, stride_ak,
            stride_ar, stride_bs, stride_br, stride_bo, stride_yn, BLOCK_T, BLOCK_R, BLOCK_K,
            IEEE,
        )  # fmt: skip


@triton.jit
def _shrink(  # pragma: no cover (compiled)
    h, xs, a, s, k, live_k, r, live_r, stride_as, stride_ak, stride_ar
):
    """``h + xs @ A_s[k, r]``: one step of a decode row's shrink over the inputs ``k``
    (``xs`` float32), products and sums (no ``tl.dot``)."""
    fs = tl.load(
        a + s * stride_as + k[:, None] * stride_ak + r[None, :] * stride_ar,
        mask=live_k[:, None] & live_r[None, :],
        other=0.0,
    ).to(tl.float32)
    return h + tl.reduce(xs[:, None] * fs, 0, _add)


@triton.jit
def _expand_factors(  # pragma: no cover (compiled)
    b, s, o, r, live_r, live_o, stride_bs, stride_br, stride_bo
):
    """``B_s[r, o]`` in float32, for a decode row's expand of the outputs ``o``. Loaded
    before the shrink, which it does not depend on, so the load's latency overlaps the
    shrink's (a decode delta is bound by its chain of loads and reductions)."""
    return tl.load(
        b + s * stride_bs + r[:, None] * stride_br + o[None, :] * stride_bo,
        mask=live_r[:, None] & live_o[None, :],
        other=0.0,
    ).to(tl.float32)


@triton.jit
def _expand(h, fb):  # pragma: no cover (compiled)
    """``h @ fb``: the expand, ``fb`` from ``_expand_factors``."""
    return tl.reduce(h[:, None] * fb, 0, _add)


@triton.jit
def _input_delta(  # pragma: no cover (compiled)
    x,  # the rows the input is formed from: the input itself, RMSNorm's x or SiLU's gate
    up,  # SiLU-multiply's up (PROLOGUE == 2; else unused)
    w,  # RMSNorm's weight (PROLOGUE == 1; else unused)
    rstd,  # the row's rms_rstd (PROLOGUE == 1)
    p,  # where the formed input rows go (PROLOGUE != 0)
    stored,  # how many columns of row n of p this program writes (n_in or 0)
    a,
    b,
    s,
    rank,
    n,
    o,
    live_o,
    n_in,
    stride_xn,
    stride_un,
    stride_pn,
    stride_as,
    stride_ak,
    stride_ar,
    stride_bs,
    stride_br,
    stride_bo,
    PROLOGUE: tl.constexpr,  # 0: x itself, 1: RMSNorm(x), 2: SiLU(x) * up
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``(q @ A_s) @ B_s[:, o]`` in float32 over the slot's first ``rank`` ranks, for ``q``
    row ``n``'s input: ``x[n]`` itself, or formed on the way (``PROLOGUE``: rounded to
    ``p``'s dtype, as the projection reads it, and written into ``p``'s first ``stored``
    columns, all or none). The shrink takes ``BLOCK_K`` inputs at a time (products and
    sums, no ``tl.dot``); the expand's factors are loaded first (``_expand_factors``)."""
    r = tl.arange(0, BLOCK_R)
    live_r = r < rank
    fb = _expand_factors(b, s, o, r, live_r, live_o, stride_bs, stride_br, stride_bo)
    h = tl.full((BLOCK_R,), 0.0, tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        live_k = k < n_in
        xs = tl.load(x + n * stride_xn + k, mask=live_k, other=0.0)
        if PROLOGUE == 0:
            q = xs
        else:
            if PROLOGUE == 1:
                q = rms_normed(xs, tl.load(w + k, mask=live_k, other=0.0), rstd)
            else:
                q = silu_mul(xs, tl.load(up + n * stride_un + k, mask=live_k, other=0.0))
            q = q.to(p.dtype.element_ty)
            tl.store(p + n * stride_pn + k, q, mask=k < stored)
        h = _shrink(
            h, q.to(tl.float32), a, s, k, live_k, r, live_r, stride_as, stride_ak, stride_ar
        )
    return _expand(h, fb)


@triton.jit
def _row_delta(  # pragma: no cover (compiled)
    x, a, b, s, rank, n, o, n_in, stride_xn, stride_as, stride_ak, stride_ar, stride_bs,
    stride_br, stride_bo, live_o, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``(x[n] @ A_s) @ B_s[:, o]`` over the slot's first ``rank`` ranks, in float32
    (``_input_delta`` of the row itself)."""
    return _input_delta(
        x, x, x, 0.0, x, 0, a, b, s, rank, n, o, live_o, n_in, stride_xn, stride_xn,
        stride_xn, stride_as, stride_ak, stride_ar, stride_bs, stride_br, stride_bo, 0,
        BLOCK_R, BLOCK_K,
    )  # fmt: skip


@triton.jit
def row_decode(  # pragma: no cover (compiled)
    x,  # [B, n_in], unit stride along n_in: one token per row
    a,  # bank A: [S, n_in, R] (any strides)
    b,  # bank B: [S, R, n_out] (any strides)
    slots,  # [B] int32, -1 = no adapter
    ranks,  # [S] int32, 0 = slot not loaded here
    y,  # [B, n_out], unit stride along n_out: (x @ A_s) @ B_s is added in place
    n_in,
    n_out,
    stride_xn,
    stride_as,
    stride_ak,
    stride_ar,
    stride_bs,
    stride_br,
    stride_bo,
    stride_yn,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program ``(row, j)``: ``y[row, j] += (x[row] @ A_s) @ B_s`` for output tile ``j``
    (``_row_delta``); a row without a slot (rank 0) does nothing."""
    row = tl.program_id(0)
    o = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(slots + row)
    rank = tl.where(slot >= 0, tl.load(ranks + tl.maximum(slot, 0)), 0)
    if rank > 0:
        n = row.to(tl.int64)
        live_o = o < n_out
        delta = _row_delta(
            x, a, b, slot.to(tl.int64), rank, n, o, n_in, stride_xn, stride_as, stride_ak,
            stride_ar, stride_bs, stride_br, stride_bo, live_o, BLOCK_R, BLOCK_K,
        )  # fmt: skip
        where = y + n * stride_yn + o
        out = tl.load(where, mask=live_o, other=0.0)
        tl.store(where, (out.to(tl.float32) + delta).to(out.dtype), mask=live_o)


@triton.jit
def store_delta(d_row, o, live_o, delta, bias):  # pragma: no cover (compiled)
    """``d_row[o] = delta`` (float32) rounded to ``d``'s dtype, plus the projection's
    ``bias[o]`` where it has one (``None``: a constexpr, no load): the buffer is what the
    projection's GEMM adds to ``x @ W^T`` (``addmm``), so a biased projection's bias goes
    in with its delta, at no launch of its own."""
    if bias is not None:
        delta += tl.load(bias + o, mask=live_o, other=0.0).to(tl.float32)
    tl.store(d_row + o, delta.to(d_row.dtype.element_ty), mask=live_o)


@triton.jit
def _decode_delta(  # pragma: no cover (compiled)
    x,
    m,  # the member: (a, b, ranks, d, n_out, strides of a (3), of b (3), of d's rows, bias)
    slots,
    row,
    o,
    n_in,
    stride_xn,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``d[row, o] = (x[row] @ A_s) @ B_s[:, o]`` (``_row_delta``), written, not added:
    0 for a row without a slot; plus the member's bias where it has one."""
    a, b, ranks, d, n_out, stride_as, stride_ak, stride_ar, stride_bs, stride_br, stride_bo, \
        stride_dn, bias = m  # fmt: skip
    slot = tl.load(slots + row)
    rank = tl.where(slot >= 0, tl.load(ranks + tl.maximum(slot, 0)), 0)
    n = row.to(tl.int64)
    live_o = o < n_out
    delta = tl.full((BLOCK_N,), 0.0, tl.float32)
    if rank > 0:
        delta = _row_delta(
            x, a, b, slot.to(tl.int64), rank, n, o, n_in, stride_xn, stride_as, stride_ak,
            stride_ar, stride_bs, stride_br, stride_bo, live_o, BLOCK_R, BLOCK_K,
        )  # fmt: skip
    store_delta(d + n * stride_dn, o, live_o, delta, bias)


@triton.jit
def row_decode_group(  # pragma: no cover (compiled)
    x,  # [B, n_in], unit stride along n_in: one token per row, the members' shared input
    slots,  # [B] int32, -1 = no adapter
    m0,  # member 0: (bank A [S, n_in, R], bank B [S, R, n_out], ranks [S], d [B, n_out],
    # n_out, A's 3 strides, B's 3 strides, d's row stride, bias [n_out] or None)
    m1,  # member 1, as member 0
    m2,  # member 2 (MEMBERS == 3; else member 1 again, never read)
    n_in,
    stride_xn,
    tiles0,  # output tiles of member 0, then of member 1
    tiles1,
    MEMBERS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The decode deltas of 2 or 3 sibling projections (q/k/v, gate/up) that read the same
    input, in one launch: program ``(row, j)`` takes output tile ``j`` of the members'
    tiles laid end to end and writes that member's ``d[row, tile]`` (``_decode_delta``).
    The members then add their ``d`` in their base GEMM."""
    row = tl.program_id(0)
    j = tl.program_id(1)
    cols = tl.arange(0, BLOCK_N)
    if j < tiles0:
        _decode_delta(
            x, m0, slots, row, j * BLOCK_N + cols, n_in, stride_xn, BLOCK_R, BLOCK_K, BLOCK_N
        )
    elif j < tiles0 + tiles1:
        _decode_delta(
            x, m1, slots, row, (j - tiles0) * BLOCK_N + cols, n_in, stride_xn, BLOCK_R, BLOCK_K,
            BLOCK_N,
        )  # fmt: skip
    elif MEMBERS == 3:
        _decode_delta(
            x, m2, slots, row, (j - tiles0 - tiles1) * BLOCK_N + cols, n_in, stride_xn, BLOCK_R,
            BLOCK_K, BLOCK_N,
        )  # fmt: skip


@triton.jit
def segment_update(  # pragma: no cover (compiled)
    x,  # [N, n_in], unit stride along n_in
    a,  # bank A: [S, n_in, R] (any strides)
    b,  # bank B: [S, R, n_out] (any strides)
    tiles,  # [3, P] int32: per program row, first token, end token, slot (>= 0)
    ranks,  # [S] int32 (> 0 for every slot in tiles)
    y,  # [N, n_out], unit stride along n_out: (x @ A_s) @ B_s is added in place
    n_tiles,
    n_in,
    n_out,
    stride_xn,
    stride_as,
    stride_ak,
    stride_ar,
    stride_bs,
    stride_br,
    stride_bo,
    stride_yn,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    """The segment form (SGMV): program ``(p, j)`` takes tile ``p``, up to ``BLOCK_T``
    consecutive tokens of one segment (``tiles`` cuts every adapted segment into such
    tiles when the routing is planned; base segments have none), and output tile ``j``:
    ``h = x[lo:hi] @ A_s`` then ``y[lo:hi, j] += h @ B_s``, as ``row_update`` does for a
    row. A prefill chunk is ``ceil(L / BLOCK_T)`` tiles, a decode token one."""
    p = tl.program_id(0)
    o = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    lo = tl.load(tiles + p)
    hi = tl.load(tiles + n_tiles + p)
    s = tl.load(tiles + 2 * n_tiles + p).to(tl.int64)
    rank = tl.load(ranks + s)
    n = lo.to(tl.int64) + tl.arange(0, BLOCK_T)
    live_t = n < hi
    _tile_update(
        x, a, b, y, s, rank, n, live_t, o, n_in, n_out, stride_xn, stride_as, stride_ak,
        stride_ar, stride_bs, stride_br, stride_bo, stride_yn, BLOCK_T, BLOCK_R, BLOCK_K, IEEE,
    )  # fmt: skip
