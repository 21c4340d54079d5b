"""Fused CUDA kernels for engine v2's steps (Triton), behind a capability check.

Why: a recorded decode step of a small model is bound by how many kernels it launches, not
by its arithmetic, and most of them are a few microseconds of elementwise work: RMSNorm is
six kernels in transformers' eager module, the rotary embedding ten, the paged decode
attention (a gather of every row's keys and values to the batch's padded width, a masked
SDPA, the copies in and out) about ten. Here each is one launch (docs/engine.md has the
measurements):

- ``decode_attention``: each row's query heads (a decode token, or one token of a prefill
  chunk in a recorded step) against its own key positions, read
  from the pool through the row's slots (no gather, only the real positions, GQA by
  sharing a key head's loads among its query heads), online softmax in float32;
- ``write_kv``: the step's keys and values into the pool (two ``index_copy_`` calls);
- ``rms_norm``: the Llama / Mistral / Qwen RMSNorm;
- ``rope``: transformers' rotary embedding of queries and keys;
- ``silu_mul``: a SiLU MLP's ``act_fn(gate) * up``.

``fused_install`` installs the last three on a model's modules, each only where the
module's own computation gives the same result on a probe input, and gives sibling
projections (q/k/v, gate/up) one weight tensor, computed by one GEMM in a recorded step.

Where the projections reading a norm's, SiLU-multiply's or decode attention's output are
served through the Triton adapter kernel's graph plans, that launch also computes their
adapter deltas (``flora.serving.backends.triton_graph.rms_norm_with_deltas``,
``silu_mul_with_delta``, ``attention_o_delta``): a decode step of a llama-style model
then launches no adapter kernel of its own, where it launched four a layer.

They serve recorded graphs only (``graphs.GraphedPagedRunner``: its recorded step, a row
per token, calls the attention kernel, and the norms, rotary embeddings and MLPs run theirs
inside ``FusedKernels.recording()``). A graph launches them at no host cost; an eager step would
launch each through Triton's Python launcher, and with the kernels in eager steps too
the day's eager numbers were lower (docs/engine.md; not settled), so eager steps keep the
torch ops.

``fused_kernels(device, dtype)`` is the capability check, as
``flora.serving.backends.triton_gpu.triton_row_kernel`` is for the adapter kernel: ``None``
(the torch paths serve) unless triton imports, the device is CUDA and a self-test of each
kernel there matches the torch reference; ``FLORA_TRITON=0`` turns it off with the adapter
kernel. The torch paths stay the reference the kernels are tested against (on the CPU
under Triton's interpreter).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import types
from typing import TypeVar

import torch
import torch.nn.functional as F

from flora.serving.backends.triton_gpu import (
    Member,
    ODelta,
    block_rank,
    member_arg,
    reference,
    reference_rms_norm,
    reference_silu_mul,
    self_tested,
    token_rows,
    triton_applies,
)

__all__ = [
    "FusedKernels",
    "fused_kernels",
    "reference_decode_attention",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << max(0, n - 1).bit_length())


class FusedKernels:
    """The kernels of one Triton module (``_fused_triton``, compiled or interpreted).

    ``recording()`` is the context (reusable, per thread) inside which the modules the
    installs served (RMSNorm, rotary embedding, SiLU MLP) run the kernels; outside it
    they run their own forward. ``prologues``: whether a norm, SiLU-multiply or decode
    attention in a recording also computes the adapter deltas of the projections that
    read its output (where their plans are graph plans of the Triton kernel); on by
    default, off to measure what that saves."""

    block_l = 64  # key positions per tile of decode attention
    # Flash decoding's split of a row's keys (`splits`): programs that fill the device
    # (`fused_kernels` sets twice its SM count; 0 never splits), the fewest key positions
    # a split takes, the most splits.
    programs_wanted = 0
    min_split = 512
    max_splits = 16
    block_c = 1024  # columns per program of SiLU-and-multiply
    o_block_n = 128  # outputs per step of o's expand in decode attention (`o_delta`)

    def __init__(self, kernels: types.ModuleType) -> None:
        self._k = kernels
        self._local = threading.local()
        self._recording = _Recording(self._local)
        self.prologues = True
        # whether sibling projections' base rows share one GEMM in a recording
        # (`fused_install.install_sibling_gemms`)
        self.sibling_gemms = True
        # whether decode attention may compute o's delta (`o_delta`); off where its own
        # self-test fails on the device (`fused_kernels`), the other kernels serving on
        self.o_deltas = True

    @property
    def settings(self) -> tuple[object, ...]:
        """What a recording bakes in of these settings (`prologues`, `sibling_gemms` and
        the split of decode attention's keys): a runner records its graphs again when it
        changes."""
        return (
            self.prologues,
            self.sibling_gemms,
            self.programs_wanted,
            self.min_split,
            self.max_splits,
        )

    @property
    def active(self) -> bool:
        """Whether this thread is inside ``recording()``."""
        return getattr(self._local, "depth", 0) > 0

    def recording(self) -> contextlib.AbstractContextManager[None]:
        return self._recording

    def decode_attention(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        read: torch.Tensor,
        lengths: torch.Tensor,
        rows: torch.Tensor,
        out: torch.Tensor,
        scale: float,
        splits: int | None = None,
        o_delta: ODelta | None = None,
    ) -> None:
        """``out[rows[b]] = softmax(q[rows[b]] k^T * scale) v`` over the keys and values
        at pool slots ``read[b, :lengths[b]]``, query head ``j`` on key head
        ``j // (H / H_kv)``. ``q``, ``out``: [T, H, D]; ``keys``, ``values``: [slots, H_kv,
        D]; ``read`` [B, L] int64; ``lengths`` [B] int32 (each >= 1); ``rows`` [B] int64.
        Tensors with unit stride along D, on one device. ``splits``: programs per row and
        key head (default ``self.splits``). ``o_delta`` (one split only): the same launch
        also writes the adapter delta of the projection that reads ``out`` (o), into
        ``o_delta.proj``'s delta buffer at ``rows``."""
        batch, (heads, dim), kv_heads = read.shape[0], q.shape[1:], keys.shape[1]
        if batch == 0:
            return
        group = heads // kv_heads
        if splits is None:
            splits = self.splits_for(read, keys)
        if o_delta is not None and splits != 1:
            raise ValueError("o's delta comes with one program a row and key head, not split keys")
        split_len = -(-read.shape[1] // splits)  # key positions per split
        if split_len > self.block_l:  # whole tiles of keys
            split_len = -(-split_len // self.block_l) * self.block_l
        # each split's partial sums (one split writes `out` itself: `part` is not read)
        part = (
            out
            if splits == 1
            else out.new_empty(batch, heads, splits, dim + 2, dtype=torch.float32)
        )
        ieee = q.dtype == torch.float32
        if o_delta is None:  # never read: o_delta's arguments of the right kinds
            unread = member_arg(Member(out, lengths, q, q))
            o_args: tuple[object, ...] = (lengths, unread, q, lengths)
            block_r = 16
        else:
            o_part = q.new_empty(batch, kv_heads, o_delta.block_r, dtype=torch.float32)
            o_args = (o_delta.slots, o_delta.proj, o_part, o_delta.done)
            block_r = o_delta.block_r
        self._k.paged_decode[(batch, kv_heads, splits)](
            q, keys, values, read, lengths, rows, out, part, *o_args,
            q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
            values.stride(0), values.stride(1), read.stride(0), out.stride(0), out.stride(1),
            split_len, scale, group,
            HEAD_DIM=dim, BLOCK_D=_pow2(dim), BLOCK_G=_pow2(group), BLOCK_L=self.block_l,
            SPLITS=splits, IEEE=ieee, O_DELTA=o_delta is not None, BLOCK_R=block_r,
            BLOCK_N=self.o_block_n,
            # exact float32 products hold the key tile in registers: with four warps they
            # spill to local memory from head_dim 128 (`bench/kernel_build.py` shows it)
            num_warps=8 if ieee else 4,
        )  # fmt: skip
        if splits > 1:
            self._k.paged_decode_combine[(batch, heads)](
                part, rows, out, heads, out.stride(0), out.stride(1),
                HEAD_DIM=dim, BLOCK_D=_pow2(dim), SPLITS=splits,
            )  # fmt: skip

    def splits_for(self, read: torch.Tensor, keys: torch.Tensor) -> int:
        """``splits`` of a ``decode_attention`` over ``read`` ([B, L]) and ``keys``."""
        return self.splits(read.shape[0] * keys.shape[1], read.shape[1])

    def splits(self, programs: int, span: int) -> int:
        """How many programs share each row's keys in ``decode_attention`` (flash
        decoding's split), for ``programs`` (rows x key heads) over ``span`` key
        positions: one while they fill the device (``programs_wanted``), else as many as
        leave each at least ``min_split`` positions, up to ``max_splits`` and no more than
        fill it. A few long rows then read their keys on many SMs instead of one each; a
        split costs a second launch (``paged_decode_combine``)."""
        if programs >= self.programs_wanted:
            return 1
        by_keys = -(-span // self.min_split)
        return max(1, min(by_keys, self.programs_wanted // programs, self.max_splits))

    def write_kv(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        write: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """``keys[write[t]] = k[t]`` and ``values[write[t]] = v[t]`` (cast to the pool's
        dtype) in one launch, for ``k``, ``v``: [T, H_kv, D]; ``keys``, ``values``: [slots,
        H_kv, D] with unit stride along D; ``write``: [T] int64 on their device."""
        (tokens, heads, dim), k, v = k.shape, _unit_last(k), _unit_last(v)
        if tokens == 0:
            return
        self._k.paged_write[(tokens, heads)](
            k, v, keys, values, write, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
            HEAD_DIM=dim, BLOCK_D=_pow2(dim),
        )  # fmt: skip

    def rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` (``unsqueeze_dim=1``):
        ``x * cos + rotate_half(x) * sin`` for ``q: [B, H, T, D]`` and ``k: [B, H_kv, T, D]``
        with ``cos``, ``sin``: [B, T, D], each product rounded to the inputs' dtype before
        the sum as torch rounds it. Results keep ``q``'s and ``k``'s strides."""
        (batch, heads, tokens, dim), kv_heads = q.shape, k.shape[1]
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        half = dim // 2
        self._k.rope[(batch * tokens, heads + kv_heads)](
            q, k, cos, sin, q_out, k_out, tokens, heads,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            cos.stride(0), cos.stride(1),
            q_out.stride(0), q_out.stride(1), q_out.stride(2),
            k_out.stride(0), k_out.stride(1), k_out.stride(2),
            HALF=half, BLOCK=_pow2(half, least=1),
        )  # fmt: skip
        return q_out, k_out

    def rope_fits(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> bool:
        """Whether ``rope`` takes these inputs (else the caller's own function serves)."""
        dim = q.shape[-1]
        return (
            q.dim() == k.dim() == 4
            and cos.dim() == sin.dim() == 3
            and dim % 2 == 0
            and k.shape[-1] == dim
            and q.shape[0] == k.shape[0] == cos.shape[0]
            and q.shape[2] == k.shape[2] == cos.shape[1]
            and cos.shape == sin.shape
            and cos.shape[-1] == dim
            and q.dtype == k.dtype == cos.dtype == sin.dtype
            and all(t.stride(-1) == 1 for t in (q, k, cos, sin))
        )

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype)``, the statistics in
        float32; the result in the promoted dtype of ``weight`` and ``x``."""
        shape, cols, x2 = x.shape, x.shape[-1], token_rows(x)
        y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
        if x2.shape[0]:
            self._k.rms_norm[(x2.shape[0],)](
                x2, weight, y, cols, x2.stride(0), y.stride(0), eps, BLOCK=_pow2(cols)
            )
        return y.view(shape)

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``act_fn(gate) * up`` of a SiLU MLP, rounded as torch rounds it (the SiLU in
        float32, then the product); ``gate`` and ``up`` of one shape and dtype."""
        g2, u2 = token_rows(gate), token_rows(up)
        out = torch.empty_like(g2)
        if g2.shape[0]:
            cols = g2.shape[1]
            block = min(self.block_c, _pow2(cols))
            self._k.silu_and_mul[(g2.shape[0], -(-cols // block))](
                g2, u2, out, cols, g2.stride(0), u2.stride(0), out.stride(0), BLOCK=block
            )
        return out.view(gate.shape)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _Recording:
    def __init__(self, local: threading.local) -> None:
        self._local = local

    def __enter__(self) -> None:
        self._local.depth = getattr(self._local, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        self._local.depth -= 1


def reference_decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    read: torch.Tensor,
    lengths: torch.Tensor,
    rows: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """What ``decode_attention`` writes at ``rows``, row by row through SDPA in float64
    ([B, H, D]; for tests and the self-test)."""
    group = q.shape[1] // keys.shape[1]
    outs = []
    for b in range(read.shape[0]):
        slots = read[b, : int(lengths[b])]
        k = keys[slots].double().repeat_interleave(group, 1).transpose(0, 1)  # [H, n, D]
        v = values[slots].double().repeat_interleave(group, 1).transpose(0, 1)
        qb = q[int(rows[b])].double().unsqueeze(1)  # [H, 1, D]
        outs.append(F.scaled_dot_product_attention(qb, k, v, scale=scale).squeeze(1))
    return torch.stack(outs)


def self_test(kernels: FusedKernels, device: torch.device, dtype: torch.dtype) -> None:
    """The kernels on small inputs on ``device`` (attention: GQA, rows of 1 and of more
    than one tile of keys, decode rows that are not the first packed tokens; the pool
    writes; RMSNorm; SiLU-and-multiply; RoPE) against the torch references; raises
    ``AssertionError`` on a mismatch."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    tol = 1e-4 if dtype == torch.float32 else 3e-2
    keys, values, q = rand(200, 2, 16), rand(200, 2, 16), rand(5, 6, 16)
    read = torch.randperm(200, generator=gen)[:150].view(2, 75).to(device)
    lengths = torch.tensor([75, 1], dtype=torch.int32, device=device)
    rows = torch.tensor([3, 0], device=device)
    want = reference_decode_attention(q, keys, values, read, lengths, rows, 0.25)
    for splits in (1, 3):  # splits of 25 positions; the 1-key row's later ones empty
        out = torch.zeros_like(q)
        kernels.decode_attention(q, keys, values, read, lengths, rows, out, 0.25, splits)
        torch.testing.assert_close(out[rows].double(), want, rtol=tol, atol=tol)
    k, v, slots = rand(3, 2, 16), rand(3, 2, 16), torch.tensor([7, 0, 150], device=device)
    want_keys, want_values = keys.clone(), values.clone()
    want_keys[slots], want_values[slots] = k, v
    kernels.write_kv(keys, values, slots, k, v)
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)
    x, w = rand(3, 40) * 3, rand(40)
    torch.testing.assert_close(
        kernels.rms_norm(x, w, 1e-5), reference_rms_norm(x, w, 1e-5), rtol=tol, atol=tol
    )
    gate, up = rand(3, 1100) * 3, rand(3, 1100)  # two programs a row
    torch.testing.assert_close(
        kernels.silu_mul(gate, up), reference_silu_mul(gate, up), rtol=tol, atol=tol
    )
    q, k, cos, sin = rand(2, 4, 3, 16), rand(2, 2, 3, 16), rand(2, 3, 16), rand(2, 3, 16)

    def rotated(x: torch.Tensor) -> torch.Tensor:  # transformers' formula
        half = torch.cat((-x[..., 8:], x[..., :8]), dim=-1)
        return x * cos.unsqueeze(1) + half * sin.unsqueeze(1)

    for got_x, x in zip(kernels.rope(q, k, cos, sin), (q, k), strict=True):
        torch.testing.assert_close(got_x, rotated(x), rtol=tol, atol=tol)


def self_test_o_delta(kernels: FusedKernels, device: torch.device, dtype: torch.dtype) -> None:
    """Decode attention with o's delta (``o_delta``) on small inputs on ``device``: GQA (two
    key heads of three query heads), decode rows that are not their tokens' rows, a base
    row and a slot of rank 0 (zeros), two launches (the done-counts left at zero for the
    next); the output as without the delta, the delta against ``reference`` of it. Raises
    ``AssertionError`` on a mismatch."""
    gen = torch.Generator().manual_seed(1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    tol = 1e-4 if dtype == torch.float32 else 3e-2
    rows_n, heads, kv_heads, dim, n_out = 4, 6, 2, 16, 150
    keys, values, q = rand(64, kv_heads, dim), rand(64, kv_heads, dim), rand(rows_n, heads, dim)
    read = torch.randperm(64, generator=gen)[:40].view(rows_n, 10).to(device)
    lengths = torch.tensor([10, 1, 7, 3], dtype=torch.int32, device=device)
    rows = torch.tensor([2, 0, 3, 1], device=device)
    ranks, slots = [5, 0, 3], [1, 0, -1, 2]
    a, b = rand(3, heads * dim, 8) / 4, rand(3, 8, n_out) / 4
    plain = torch.zeros_like(q)
    kernels.decode_attention(q, keys, values, read, lengths, rows, plain, 0.25, 1)
    done = torch.zeros(rows_n, dtype=torch.int32, device=device)
    for bias in (None, rand(n_out)):  # twice: the counts reset; a bias-free o and a biased
        out = torch.zeros_like(q)
        d = torch.full((rows_n, n_out), float("nan"), device=device, dtype=dtype)
        ranks_t = torch.tensor(ranks, dtype=torch.int32, device=device)
        slots_t = torch.tensor(slots, dtype=torch.int32, device=device)
        proj = member_arg(Member(d, ranks_t, a, b, bias))
        o_delta = ODelta(slots_t, proj, done, block_rank(max(ranks)))
        kernels.decode_attention(q, keys, values, read, lengths, rows, out, 0.25, 1, o_delta)
        assert torch.equal(out, plain), "o's delta changed the attention output"
        want = reference(out.view(rows_n, -1), slots, ranks, a, b)
        if bias is not None:
            want += bias.double()
        torch.testing.assert_close(d.double(), want, rtol=tol, atol=tol)
        assert not done.any(), "the done-counts were not left at zero"


@functools.cache
def fused_kernels(device: torch.device, dtype: torch.dtype) -> FusedKernels | None:
    """The kernels for ``dtype`` on ``device`` after a self-test there, or ``None`` (not
    CUDA, triton missing, ``FLORA_TRITON=0``, or it fails to compile or to match: logged
    once, and the torch paths serve)."""
    if not triton_applies(device, dtype):
        return None

    def make() -> FusedKernels:
        from flora_server.engine.paged import _fused_triton

        kernels = FusedKernels(_fused_triton)
        self_test(kernels, device, dtype)
        kernels.programs_wanted = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        try:
            self_test_o_delta(kernels, device, dtype)
        except Exception as exc:  # a compiler or device the epilogue fails on
            log.warning("o's delta inside decode attention disabled on %s: %s", device, exc)
            kernels.o_deltas = False
        return kernels

    return self_tested("fused decode kernels", make, device, dtype)
