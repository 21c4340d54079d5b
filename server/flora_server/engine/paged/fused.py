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
- ``rms_norm``: the Llama / Mistral / Qwen RMSNorm, installed on a model's RMSNorm modules
  by ``install_rms_norms`` only where the module's own forward gives the same result on a
  probe input (Gemma's ``1 + weight`` form, say, is left alone);
- ``rope``: transformers' rotary embedding of queries and keys, installed by
  ``install_rope`` through transformers' per-module kernel hook, with the same probe.

They serve recorded graphs only (``graphs.GraphedPagedRunner``: its recorded step, a row
per token, calls the attention kernel, and the norms and rotary embeddings run theirs
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
import math
import threading
import types
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from flora.serving.backends.triton_gpu import self_tested, triton_applies

__all__ = [
    "ROTARY_KERNEL_NAME",
    "FusedKernels",
    "fused_kernels",
    "install_rms_norms",
    "install_rope",
    "reference_decode_attention",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# The hub-kernel layer name transformers gives `apply_rotary_pos_emb`
# (`use_kernel_forward_from_hub("rotary_pos_emb")`), which keys an attention module's
# private wrapper of it.
ROTARY_KERNEL_NAME = "rotary_pos_emb"


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << max(0, n - 1).bit_length())


class FusedKernels:
    """The kernels of one Triton module (``_fused_triton``, compiled or interpreted).

    ``recording()`` is the context (reusable, per thread) inside which the RMSNorm modules
    ``install_rms_norms`` served run the kernel; outside it they run their own forward."""

    block_l = 64  # key positions per tile of decode attention

    def __init__(self, kernels: types.ModuleType) -> None:
        self._k = kernels
        self._local = threading.local()
        self._recording = _Recording(self._local)

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
    ) -> None:
        """``out[rows[b]] = softmax(q[rows[b]] k^T * scale) v`` over the keys and values
        at pool slots ``read[b, :lengths[b]]``, query head ``j`` on key head
        ``j // (H / H_kv)``. ``q``, ``out``: [T, H, D]; ``keys``, ``values``: [slots, H_kv,
        D]; ``read`` [B, L] int64; ``lengths`` [B] int32 (each >= 1); ``rows`` [B] int64.
        Tensors with unit stride along D, on one device."""
        batch, (heads, dim), kv_heads = read.shape[0], q.shape[1:], keys.shape[1]
        if batch == 0:
            return
        group = heads // kv_heads
        self._k.paged_decode[(batch, kv_heads)](
            q, keys, values, read, lengths, rows, out,
            q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
            values.stride(0), values.stride(1), read.stride(0), out.stride(0), out.stride(1),
            scale, group,
            HEAD_DIM=dim, BLOCK_D=_pow2(dim), BLOCK_G=_pow2(group), BLOCK_L=self.block_l,
            IEEE=q.dtype == torch.float32,
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
        shape, cols = x.shape, x.shape[-1]
        x2 = x.reshape(-1, cols)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
        if x2.shape[0]:
            self._k.rms_norm[(x2.shape[0],)](
                x2, weight, y, cols, x2.stride(0), y.stride(0), eps, BLOCK=_pow2(cols)
            )
        return y.view(shape)


class _Recording:
    def __init__(self, local: threading.local) -> None:
        self._local = local

    def __enter__(self) -> None:
        self._local.depth = getattr(self._local, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        self._local.depth -= 1


class _GraphNorm:
    """An RMSNorm module's forward: the kernel inside ``kernels.recording()``, else the
    module's own forward."""

    def __init__(self, kernels: FusedKernels, weight: torch.Tensor, eps: float, own: Any) -> None:
        self.kernels, self.weight, self.eps, self.own = kernels, weight, eps, own

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels.active:
            return self.kernels.rms_norm(x, self.weight, self.eps)
        return self.own(x)


def _graph_rope(
    wrapper: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of an attention module's rotary-embedding wrapper (transformers'
    per-module kernel hook, ``install_rope``; bound to the wrapper, as the hook calls
    ``forward.__func__`` under a compiler): the kernel inside ``kernels.recording()``
    where it takes the inputs, else the module's own function."""
    kernels, own = wrapper._flora_rope
    if kernels.active and unsqueeze_dim == 1 and kernels.rope_fits(q, k, cos, sin):
        return kernels.rope(q, k, cos, sin)
    return own(q, k, cos, sin, unsqueeze_dim)


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
    than one tile of keys, decode rows that are not the first packed tokens; RMSNorm;
    RoPE) against the torch references; raises ``AssertionError`` on a mismatch."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    tol = 1e-4 if dtype == torch.float32 else 3e-2
    keys, values, q = rand(200, 2, 16), rand(200, 2, 16), rand(5, 6, 16)
    read = torch.randperm(200, generator=gen)[:150].view(2, 75).to(device)
    lengths = torch.tensor([75, 1], dtype=torch.int32, device=device)
    rows = torch.tensor([3, 0], device=device)
    out = torch.zeros_like(q)
    kernels.decode_attention(q, keys, values, read, lengths, rows, out, 0.25)
    want = reference_decode_attention(q, keys, values, read, lengths, rows, 0.25)
    torch.testing.assert_close(out[rows].double(), want, rtol=tol, atol=tol)
    x, w = rand(3, 40) * 3, rand(40)
    got = kernels.rms_norm(x, w, 1e-5)
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    torch.testing.assert_close(got, w * normed, rtol=tol, atol=tol)
    q, k, cos, sin = rand(2, 4, 3, 16), rand(2, 2, 3, 16), rand(2, 3, 16), rand(2, 3, 16)

    def rotated(x: torch.Tensor) -> torch.Tensor:  # transformers' formula
        half = torch.cat((-x[..., 8:], x[..., :8]), dim=-1)
        return x * cos.unsqueeze(1) + half * sin.unsqueeze(1)

    for got_x, x in zip(kernels.rope(q, k, cos, sin), (q, k), strict=True):
        torch.testing.assert_close(got_x, rotated(x), rtol=tol, atol=tol)


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
        return kernels

    return self_tested("fused decode kernels", make, device, dtype)


def install_rms_norms(model: torch.nn.Module, kernels: FusedKernels) -> int:
    """Serve every RMSNorm module of ``model`` through ``kernels.rms_norm`` inside
    ``kernels.recording()``, where the kernel gives what the module's own forward gives
    on a probe input (the same values in its dtype, to a rounding of the float32
    statistics); returns how many. Idempotent: a module already served keeps its
    forward."""

    def find(module: torch.nn.Module) -> tuple[torch.Tensor, float] | None:
        if not type(module).__name__.endswith("RMSNorm") or "forward" in vars(module):
            return None
        eps, weight = _eps_of(module), getattr(module, "weight", None)
        if eps is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            return None
        return weight, eps

    def serve(module: torch.nn.Module, found: tuple[torch.Tensor, float]) -> None:
        module.forward = _GraphNorm(kernels, *found, module.forward)

    return _serve_where_same(
        model, "RMSNorm", find, lambda m, f: _same_as_module(m, kernels, *f), serve
    )


def _eps_of(module: torch.nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float) and math.isfinite(value):
            return value
    return None


def install_rope(model: torch.nn.Module, kernels: FusedKernels) -> int:
    """Serve the rotary embedding of every attention module of ``model`` through
    ``kernels.rope`` inside ``kernels.recording()``, where the kernel gives what the
    module's own ``apply_rotary_pos_emb`` gives on a probe input; returns how many.

    The hook is transformers' own: an attention class decorated with
    ``use_kernelized_func(apply_rotary_pos_emb)`` keeps a private wrapper of the function
    per instance (``_kernel_funcs[ROTARY_KERNEL_NAME]``, with the ``kernels`` package
    installed) and routes its forward's call of the module-level function through it; its
    ``forward`` is what ``kernels.kernelize`` replaces, and what this replaces. Modules
    without the hook keep their rotary embedding. Idempotent."""

    def find(module: torch.nn.Module) -> tuple[Any, int, torch.Tensor] | None:
        funcs = vars(module).get("_kernel_funcs")
        wrapper = funcs.get(ROTARY_KERNEL_NAME) if isinstance(funcs, dict) else None
        dim, weight = getattr(module, "head_dim", None), next(module.parameters(), None)
        if wrapper is None or "forward" in vars(wrapper):
            return None
        if not isinstance(dim, int) or weight is None:
            return None
        return wrapper, dim, weight

    def matches(module: torch.nn.Module, found: tuple[Any, int, torch.Tensor]) -> bool:
        wrapper, dim, weight = found
        return _rope_matches(wrapper.forward, kernels, dim, weight)

    def serve(module: torch.nn.Module, found: tuple[Any, int, torch.Tensor]) -> None:
        wrapper = found[0]
        wrapper._flora_rope = (kernels, wrapper.forward)
        wrapper.forward = types.MethodType(_graph_rope, wrapper)

    return _serve_where_same(model, "rotary embedding", find, matches, serve)


def _serve_where_same(
    model: torch.nn.Module,
    what: str,
    find: Callable[[torch.nn.Module], T | None],
    matches: Callable[[torch.nn.Module, T], bool],
    serve: Callable[[torch.nn.Module, T], None],
) -> int:
    """``serve`` every module of ``model`` that ``find`` takes (with what it found), where
    ``matches`` (the kernel against the module's own computation on a probe, run once per
    module class) holds; returns how many were served."""
    served = 0
    checked: dict[type, bool] = {}
    for module in model.modules():
        found = find(module)
        if found is None:
            continue
        kind = type(module)
        if kind not in checked:
            checked[kind] = matches(module, found)
            if not checked[kind]:
                log.info("%s keeps its own %s: the fused one differs", kind.__name__, what)
        if checked[kind]:
            serve(module, found)
            served += 1
    return served


@torch.inference_mode()
def _same_as_module(
    module: torch.nn.Module, kernels: FusedKernels, weight: torch.Tensor, eps: float
) -> bool:
    gen = torch.Generator().manual_seed(0)
    probe = (torch.randn(4, weight.shape[0], generator=gen) * 3).to(weight.device, weight.dtype)
    want: Any = module(probe)
    return _close(kernels.rms_norm(probe, weight, eps), want)


@torch.inference_mode()
def _rope_matches(own: Any, kernels: FusedKernels, dim: int, like: torch.Tensor) -> bool:
    """The kernel against a module's own rotary embedding on random queries, keys and
    angles in the module's dtype, on its device (2 query heads, 1 key head, 3 tokens)."""
    if dim % 2:
        return False
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(like.device, like.dtype)

    q, k = rand(1, 2, 3, dim), rand(1, 1, 3, dim)
    angles = torch.rand(1, 3, dim, generator=gen) * 6.3
    cos, sin = (f(angles).to(like.device, like.dtype) for f in (torch.cos, torch.sin))
    want: Any = own(q, k, cos, sin)
    got = kernels.rope(q, k, cos, sin)
    return isinstance(want, tuple) and len(want) == 2 and all(map(_close, got, want))


def _close(got: torch.Tensor, want: Any) -> bool:
    """``got`` is what a module's own forward gave (``want``): same shape and dtype, values
    to float32 rounding (float32) or one rounding of the half type."""
    if not isinstance(want, torch.Tensor) or want.shape != got.shape or want.dtype != got.dtype:
        return False
    tol = 1e-5 if want.dtype == torch.float32 else 1e-2
    return bool(torch.allclose(got.float(), want.float(), rtol=tol, atol=tol))
