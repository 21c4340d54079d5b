"""Triton bodies of ``flora.serving.backends.triton_gpu``'s prologue kernels (imported only
through it, where triton is installed): a decode step's adapter deltas computed inside
the row-wise kernel that produces the projections' input, instead of in a launch of
their own.

In a llama-style block the input of q/k/v is an RMSNorm of the hidden state, the input
of gate/up another, and the input of down ``SiLU(gate) * up``. Each is one row-wise
kernel of a recorded step anyway (the engine's fused norm, its fused SiLU-and-multiply),
and a decode row's shrink needs the whole row, as the norm does:

- ``norm_decode_group``: program ``(row, j)`` normalises the row (``rms_rstd``,
  ``rms_normed``) and computes output tile ``j`` of the sibling group's deltas from it,
  as ``row_decode_group`` does from a normalised input; tile 0's program also writes the
  normalised row (every program computes it; only one stores it).
- ``act_decode``: program ``(row, j)`` forms ``SiLU(gate) * up`` for the row
  (``silu_mul``) and writes output tile ``j`` of down's delta; tile 0's program writes the
  product, which down's GEMM reads with the delta.

- ``o_epilogue``: the delta of the projection that reads an attention output (o), from
  inside the engine's decode attention kernel, whose programs each hold one key head's
  query heads of a row: each adds its heads' part of the shrink to a per-row buffer slot
  of its own and counts itself done; the row's last program sums the parts (in order:
  the same result on every run) and writes the row's delta.

A decode step of a llama-style model then launches no adapter kernel of its own beside
the base step's, where ``row_decode_group`` and ``row_decode`` take four a layer. The
norm's and SiLU-multiply's formulas (``rms_rstd``, ``rms_normed``, ``silu_mul``) and the
delta of a row computed on the way (``_input_delta``) are ``_row_kernel_triton``'s; the
engine's plain kernels (``flora_server.engine.paged._fused_triton``) call the formulas too.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flora.serving.backends._row_kernel_triton import (
    _add,
    _expand,
    _expand_factors,
    _input_delta,
    _shrink,
    rms_rstd,
    store_delta,
)


@triton.jit
def _prologue_member(  # pragma: no cover (compiled)
    x, up, w, rstd, p, stored, slot, m, n, o, n_in, stride_xn, stride_un, stride_pn,
    PROLOGUE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Member ``m``'s tile ``o`` of row ``n`` (``_input_delta``): ``d[n, o]`` written (0
    for a row without a slot or a slot the member does not hold; plus the member's bias
    where it has one), and ``stored`` columns of ``p[n]``. ``m`` as ``row_decode_group``'s
    members: (bank A, bank B, ranks, d, n_out, A's strides, B's strides, d's row stride,
    bias or None)."""
    a, b, ranks, d, n_out, stride_as, stride_ak, stride_ar, stride_bs, stride_br, stride_bo, \
        stride_dn, bias = m  # fmt: skip
    rank = tl.where(slot >= 0, tl.load(ranks + tl.maximum(slot, 0)), 0)
    live_o = o < n_out
    delta = _input_delta(
        x, up, w, rstd, p, stored, a, b, tl.maximum(slot, 0).to(tl.int64), rank, n, o, live_o,
        n_in, stride_xn, stride_un, stride_pn, stride_as, stride_ak, stride_ar, stride_bs,
        stride_br, stride_bo, PROLOGUE, BLOCK_R, BLOCK_K,
    )  # fmt: skip
    store_delta(d + n * stride_dn, o, live_o, delta, bias)


@triton.jit
def norm_decode_group(  # pragma: no cover (compiled)
    x,  # [B, n_in], unit stride along n_in: the rows to normalise, one token per row
    w,  # [n_in]: the norm's weight
    y,  # [B, n_in], unit stride along n_in: the normalised rows (the members' input)
    slots,  # [B] int32, -1 = no adapter
    m0,  # the members, as row_decode_group's: (bank A, bank B, ranks, d, n_out, strides)
    m1,
    m2,  # (MEMBERS == 3; else member 1 again, never read)
    n_in,
    stride_xn,
    stride_yn,
    eps,
    tiles0,  # output tiles of member 0, then of member 1
    tiles1,
    MEMBERS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,  # a power of two >= n_in (the norm's statistics in one pass)
):
    """``y = RMSNorm(x)`` and the decode deltas of 2 or 3 sibling projections that read
    ``y`` (q/k/v, gate/up), in one launch: program ``(row, j)`` takes output tile ``j`` of
    the members' tiles laid end to end, as ``row_decode_group``, computing the row's norm
    on the way; the program of tile 0 also writes ``y[row]``."""
    row = tl.program_id(0)
    j = tl.program_id(1)
    n = row.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    slot = tl.load(slots + row)
    rstd = rms_rstd(x + n * stride_xn, n_in, eps, BLOCK_C)
    stored = tl.where(j == 0, n_in, 0)  # tile 0's program writes y[row]
    if j < tiles0:
        _prologue_member(
            x, x, w, rstd, y, stored, slot, m0, n, j * BLOCK_N + cols, n_in, stride_xn,
            stride_xn, stride_yn, 1, BLOCK_R, BLOCK_K,
        )  # fmt: skip
    elif j < tiles0 + tiles1:
        _prologue_member(
            x, x, w, rstd, y, stored, slot, m1, n, (j - tiles0) * BLOCK_N + cols, n_in,
            stride_xn, stride_xn, stride_yn, 1, BLOCK_R, BLOCK_K,
        )  # fmt: skip
    elif MEMBERS == 3:
        _prologue_member(
            x, x, w, rstd, y, stored, slot, m2, n, (j - tiles0 - tiles1) * BLOCK_N + cols,
            n_in, stride_xn, stride_xn, stride_yn, 1, BLOCK_R, BLOCK_K,
        )  # fmt: skip


@triton.jit
def act_decode(  # pragma: no cover (compiled)
    gate,  # [B, n_in], unit stride along n_in: one token per row
    up,  # [B, n_in], as gate
    act,  # [B, n_in], unit stride along n_in: SiLU(gate) * up, the projection's input
    slots,  # [B] int32, -1 = no adapter
    m,  # the projection, as a member of row_decode_group: (bank A, bank B, ranks, d, ...)
    n_in,
    stride_gn,
    stride_un,
    stride_pn,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``act = SiLU(gate) * up`` and the decode delta of the projection that reads it
    (down), in one launch: program ``(row, j)`` writes ``d[row, tile j]`` (0 for a row
    without a slot); the program of tile 0 also writes ``act[row]``."""
    row = tl.program_id(0)
    j = tl.program_id(1)
    o = j * BLOCK_N + tl.arange(0, BLOCK_N)
    stored = tl.where(j == 0, n_in, 0)  # tile 0's program writes act[row]
    _prologue_member(
        gate, up, gate, 0.0, act, stored, tl.load(slots + row), m, row.to(tl.int64), o, n_in,
        stride_gn, stride_un, stride_pn, 2, BLOCK_R, BLOCK_K,
    )  # fmt: skip


@triton.jit
def o_epilogue(  # pragma: no cover (compiled)
    o,  # [BLOCK_G, BLOCK_D] float32: query heads h * group + g of the row's attention output
    b,  # the decode row (of `part` and `count`)
    row,  # its token: the row of `slots` and of the delta
    h,  # the key head whose query heads this program holds
    kv_heads,  # programs per row
    group,  # query heads per key head
    slots,  # [T] int32, -1 = no adapter
    m,  # the projection (o), as a member of row_decode_group: (bank A, bank B, ranks, d, ...)
    part,  # [B, kv_heads, BLOCK_R] float32: each program's part of the shrink
    count,  # [B] int32: the row's programs done; 0 before the launch, and left 0 after
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``d[row] = (attention output row @ A_s) @ B_s`` (0 for a row without a slot; plus
    the projection's bias where it has one) from the attention program ``(b, h)``: its
    heads' part of the shrink to ``part[b, h]``, then one count; the program that counts
    last (the stores of the others are ordered before their counts by the atomic's
    acquire-release) sums the parts in order of ``h`` and expands them. Input column
    ``(h * group + g) * HEAD_DIM + j`` of the projection is ``o[g, j]``, as transformers
    flattens the heads."""
    a, bb, ranks, d, n_out, stride_as, stride_ak, stride_ar, stride_bs, stride_br, stride_bo, \
        stride_dn, bias = m  # fmt: skip
    slot = tl.load(slots + row)
    rank = tl.where(slot >= 0, tl.load(ranks + tl.maximum(slot, 0)), 0)
    s = tl.maximum(slot, 0).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    live_r = r < rank
    g = tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_D)
    total = tl.full((BLOCK_R,), 0.0, tl.float32)
    last = h == 0  # a row without a slot: program 0 writes its zeros
    if rank > 0:
        shrunk = tl.full((BLOCK_R,), 0.0, tl.float32)
        for gg in range(0, group):
            head = tl.reduce(tl.where(g[:, None] == gg, o, 0.0), 0, _add)  # [BLOCK_D]
            k = (h * group + gg) * HEAD_DIM + j
            shrunk = _shrink(
                shrunk, head, a, s, k, j < HEAD_DIM, r, live_r, stride_as, stride_ak, stride_ar
            )
        tl.store(part + (b * kv_heads + h) * BLOCK_R + r, shrunk)
        last = tl.atomic_add(count + b, 1) == kv_heads - 1  # the row's last program
        if last:
            for hh in range(0, kv_heads):
                total += tl.load(part + (b * kv_heads + hh) * BLOCK_R + r, cache_modifier=".cg")
            tl.atomic_xchg(count + b, 0)  # for the next launch
    if last:  # the expand (of zeros past the rank: none loaded)
        for o0 in range(0, n_out, BLOCK_N):
            oc = o0 + tl.arange(0, BLOCK_N)
            live_o = oc < n_out
            fb = _expand_factors(bb, s, oc, r, live_r, live_o, stride_bs, stride_br, stride_bo)
            store_delta(d + row * stride_dn, oc, live_o, _expand(total, fb), bias)
