"""Triton bodies of ``flora_server.engine.paged.fused`` (imported only through it, where
triton is installed): the decode step's attention over the paged pool and its writes
into it, RMSNorm, the rotary embedding and SiLU-and-multiply, each one launch where the
eager modules take several. The norm's and SiLU-multiply's formulas are
``flora.serving.backends._row_kernel_triton``'s, whose prologue kernels compute adapter
deltas inside them (``_prologue_triton``); decode attention computes the delta of o, the
projection that reads its output, through ``_prologue_triton.o_epilogue``.

Only builtins of ``triton.language`` are used, the reductions being ``tl.reduce`` with
triton's own combiners (``_add``, ``_max``): the helpers of ``triton.language.standard``
(``tl.sum``, ``tl.max``) are compiled when triton is imported, so Triton's interpreter,
which the CPU tests use, could not run them if triton was imported before it was
switched on; it recognises these combiners without running them and reduces in numpy.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flora.serving.backends._prologue_triton import o_epilogue
from flora.serving.backends._row_kernel_triton import rms_normed, rms_rstd, silu_mul

_add = tl.standard._sum_combine  # a + b
_max = tl.standard._elementwise_max  # tl.maximum(a, b)


@triton.jit
def paged_decode(  # pragma: no cover (compiled)
    q,  # [T, H, D] (any strides but unit along D): the step's queries
    keys,  # pool keys of one layer: [slots, H_kv, D], unit stride along D
    values,  # pool values of one layer, as keys
    read,  # [B, L] int64: the pool slot of each row's key positions 0..L-1
    lengths,  # [B] int32: how many of a row's positions it attends to (>= 1)
    rows,  # [B] int64: the packed token (row of q and out) of each decode row
    out,  # [T, H, D] (unit stride along D): written at `rows` (SPLITS == 1)
    part,  # [B, H, S, D + 2] float32: each split's acc, max and sum (SPLITS > 1)
    o_slots,  # O_DELTA: o_epilogue's slots, projection, part and count (else unused)
    o_proj,
    o_part,
    o_count,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_rb,
    stride_ot,
    stride_oh,
    split_len,  # key positions per split
    scale,
    group,  # query heads per key head (GQA)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_L: tl.constexpr,
    SPLITS: tl.constexpr,
    IEEE: tl.constexpr,  # float32 inputs: exact float32 products, not TF32
    O_DELTA: tl.constexpr,  # SPLITS == 1: also the adapter delta of the projection reading out
    BLOCK_R: tl.constexpr,  # O_DELTA: the rank tile, and the outputs per step of its expand
    BLOCK_N: tl.constexpr,
):
    """Program ``(b, h, s)``: decode row ``b``'s query heads that share key head ``h``,
    against split ``s`` of the row's first ``lengths[b]`` key positions (positions
    ``s * split_len`` on, ``split_len`` of them), read from the pool through ``read`` in
    tiles of ``BLOCK_L`` with an online softmax (flash decoding). Only the real positions
    are read, not the batch's padded width. One split: the result goes to ``out``; more:
    each split's unnormalised sum, maximum and total go to ``part`` for
    ``paged_decode_combine``. ``O_DELTA``: the row's output also goes through
    ``o_epilogue`` (the delta of the projection that reads it, o)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    row = tl.load(rows + b)
    lo = split * split_len
    hi = tl.minimum(tl.load(lengths + b).to(tl.int64), lo + split_len)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = h * group + g
    live_qd = (g < group)[:, None] & (d < HEAD_DIM)[None, :]
    qs = tl.load(q + row * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=live_qd)
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    total = tl.full((BLOCK_G,), 0.0, tl.float32)
    acc = tl.full((BLOCK_G, BLOCK_D), 0.0, tl.float32)
    for start in range(lo, hi, BLOCK_L):
        p = start + tl.arange(0, BLOCK_L)
        live = p < hi
        slot = tl.load(read + b * stride_rb + p, mask=live, other=0)
        live_kd = live[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(
            keys + slot[:, None] * stride_ks + h * stride_kh + d[None, :], mask=live_kd, other=0.0
        ).to(qs.dtype)
        if IEEE:  # noqa: SIM108 (a constexpr branch: one of the two is compiled)
            s = tl.dot(qs, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(qs, tl.trans(k))
        s = tl.where(live[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.reduce(s, 1, _max))
        alpha = tl.exp(m - m_new)
        prob = tl.exp(s - m_new[:, None])
        total = total * alpha + tl.reduce(prob, 1, _add)
        v = tl.load(
            values + slot[:, None] * stride_vs + h * stride_vh + d[None, :], mask=live_kd, other=0.0
        ).to(qs.dtype)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(prob, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v)
        m = m_new
    if SPLITS == 1:
        o = (acc / total[:, None]).to(out.dtype.element_ty)
        where = out + row * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(where, o, mask=live_qd)
        if O_DELTA:  # from the output as stored: what the projection reads
            o_epilogue(
                o.to(tl.float32), b, row, h, tl.num_programs(1), group, o_slots, o_proj,
                o_part, o_count, HEAD_DIM, BLOCK_G, BLOCK_D, BLOCK_R, BLOCK_N,
            )  # fmt: skip
    else:  # an empty split (past the row's length) leaves max -inf, total 0
        at = part + ((b * group * tl.num_programs(1) + heads) * SPLITS + split) * (HEAD_DIM + 2)
        tl.store(at[:, None] + d[None, :], acc, mask=live_qd)
        tl.store(at + HEAD_DIM, m, mask=g < group)
        tl.store(at + HEAD_DIM + 1, total, mask=g < group)


@triton.jit
def paged_decode_combine(  # pragma: no cover (compiled)
    part,  # [B, H, S, D + 2] float32, as `paged_decode` wrote it
    rows,  # [B] int64
    out,  # [T, H, D] (unit stride along D): written at `rows`
    heads,  # H
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS: tl.constexpr,
):
    """Program ``(b, j)``: row ``b``'s query head ``j`` from its splits' partial softmax
    sums, each rescaled to the largest maximum. Split 0 always holds a key (every row
    has one), so the running maximum is finite from the start."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    live = d < HEAD_DIM
    at = part + (b * heads + j) * SPLITS * (HEAD_DIM + 2)
    acc = tl.load(at + d, mask=live, other=0.0)
    m = tl.load(at + HEAD_DIM)
    total = tl.load(at + HEAD_DIM + 1)
    for split in tl.static_range(1, SPLITS):
        here = at + split * (HEAD_DIM + 2)
        m_s = tl.load(here + HEAD_DIM)
        m_new = tl.maximum(m, m_s)
        a, c = tl.exp(m - m_new), tl.exp(m_s - m_new)
        acc = acc * a + tl.load(here + d, mask=live, other=0.0) * c
        total = total * a + tl.load(here + HEAD_DIM + 1) * c
        m = m_new
    row = tl.load(rows + b)
    tl.store(
        out + row * stride_ot + j * stride_oh + d, (acc / total).to(out.dtype.element_ty), mask=live
    )


@triton.jit
def paged_write(  # pragma: no cover (compiled)
    k,  # [T, H_kv, D] (any strides but unit along D): the step's keys
    v,  # [T, H_kv, D], as k: the step's values
    keys,  # pool keys of one layer: [slots, H_kv, D], unit stride along D
    values,  # pool values of one layer, as keys
    write,  # [T] int64: the pool slot of each token
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ks,
    stride_kp,
    stride_vs,
    stride_vp,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program ``(t, h)``: token ``t``'s key and value of head ``h`` into the pool at slot
    ``write[t]``, cast to the pool's dtype (what two ``index_copy_`` calls do)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    slot = tl.load(write + t)
    d = tl.arange(0, BLOCK_D)
    live = d < HEAD_DIM
    ks = tl.load(k + t * stride_kt + h * stride_kh + d, mask=live)
    vs = tl.load(v + t * stride_vt + h * stride_vh + d, mask=live)
    tl.store(keys + slot * stride_ks + h * stride_kp + d, ks.to(keys.dtype.element_ty), mask=live)
    tl.store(
        values + slot * stride_vs + h * stride_vp + d, vs.to(values.dtype.element_ty), mask=live
    )


@triton.jit
def rms_norm(  # pragma: no cover (compiled)
    x,  # [N, C], unit stride along C
    w,  # [C]
    y,  # [N, C], unit stride along C
    n_cols,
    stride_x,
    stride_y,
    eps,
    BLOCK: tl.constexpr,
):
    """Row ``r``: ``y = w * (x * rsqrt(mean(x^2) + eps)).to(x's dtype)``, in float32 up to
    that cast, the product rounded to ``y``'s dtype: the Llama / Mistral / Qwen RMSNorm
    step by step (``rms_rstd``, ``rms_normed``; ``fused.FusedKernels.rms_norm`` checks a
    module against it)."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    live = c < n_cols
    rstd = rms_rstd(x + r * stride_x, n_cols, eps, BLOCK)
    xs = tl.load(x + r * stride_x + c, mask=live, other=0.0)
    out = rms_normed(xs, tl.load(w + c, mask=live, other=0.0), rstd)
    tl.store(y + r * stride_y + c, out.to(y.dtype.element_ty), mask=live)


@triton.jit
def silu_and_mul(  # pragma: no cover (compiled)
    gate,  # [N, C], unit stride along C
    up,  # [N, C], unit stride along C
    out,  # [N, C], unit stride along C
    n_cols,
    stride_g,
    stride_u,
    stride_o,
    BLOCK: tl.constexpr,
):
    """Program ``(r, j)``: columns ``j * BLOCK ...`` of row ``r`` of ``SiLU(gate) * up``,
    rounded as torch rounds ``act_fn(gate) * up`` (``silu_mul``)."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = c < n_cols
    gs = tl.load(gate + r * stride_g + c, mask=live, other=0.0)
    us = tl.load(up + r * stride_u + c, mask=live, other=0.0)
    tl.store(out + r * stride_o + c, silu_mul(gs, us), mask=live)


@triton.jit
def _rotate_half_into(  # pragma: no cover (compiled)
    src, dst, c1, c2, s1, s2, d, live, HALF: tl.constexpr
):
    """``dst = src * cos + rotate_half(src) * sin`` for one head's vector, each product
    rounded to the tensors' dtype before the sum, as torch computes it."""
    x1 = tl.load(src + d, mask=live)
    x2 = tl.load(src + HALF + d, mask=live)
    kind = x1.dtype
    lo = (x1 * c1).to(kind).to(tl.float32) + (-x2 * s1).to(kind).to(tl.float32)
    hi = (x2 * c2).to(kind).to(tl.float32) + (x1 * s2).to(kind).to(tl.float32)
    tl.store(dst + d, lo.to(kind), mask=live)
    tl.store(dst + HALF + d, hi.to(kind), mask=live)


@triton.jit
def rope(  # pragma: no cover (compiled)
    q,  # [B, H, T, D] (any strides but unit along D)
    k,  # [B, H_kv, T, D]
    cos,  # [B, T, D], unit stride along D
    sin,  # [B, T, D], as cos
    q_out,  # as q
    k_out,  # as k
    tokens,  # T
    heads,  # H
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_cb,
    stride_ct,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_pb,
    stride_ph,
    stride_pt,
    HALF: tl.constexpr,  # D / 2
    BLOCK: tl.constexpr,  # a power of two >= HALF
):
    """Program ``(b * T + t, j)``: transformers' ``apply_rotary_pos_emb`` for position
    ``t`` of batch row ``b`` on query head ``j`` (``j < H``) or key head ``j - H``."""
    n = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    b = n // tokens
    t = n % tokens
    d = tl.arange(0, BLOCK)
    live = d < HALF
    at = b * stride_cb + t * stride_ct
    c1 = tl.load(cos + at + d, mask=live)
    c2 = tl.load(cos + at + HALF + d, mask=live)
    s1 = tl.load(sin + at + d, mask=live)
    s2 = tl.load(sin + at + HALF + d, mask=live)
    if j < heads:
        src = q + b * stride_qb + j * stride_qh + t * stride_qt
        dst = q_out + b * stride_ob + j * stride_oh + t * stride_ot
        _rotate_half_into(src, dst, c1, c2, s1, s2, d, live, HALF)
    else:
        h = j - heads
        src = k + b * stride_kb + h * stride_kh + t * stride_kt
        dst = k_out + b * stride_pb + h * stride_ph + t * stride_pt
        _rotate_half_into(src, dst, c1, c2, s1, s2, d, live, HALF)
