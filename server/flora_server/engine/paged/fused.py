"""Fused CUDA kernels for engine v2's steps (Triton), behind a capability check.

Why: a decode step of a small model is bound by how many kernels it launches, not by its
arithmetic. On the H200, SmolLM2-135M's recorded batch-32 decode graph took 3.8 ms of GPU
time for 30 layers, about 48 kernels per layer, most of them a few microseconds of
elementwise work: RMSNorm is six kernels in transformers' eager module, the paged decode
attention (a gather of every row's keys and values to the batch's padded width, a masked
SDPA, the copies in and out) about ten. Here each is one launch:

- ``decode_attention``: each decode row's query heads against its own key positions, read
  from the pool through the row's slots (no gather, only the real positions, GQA by
  sharing a key head's loads among its query heads), online softmax in float32;
- ``rms_norm``: the Llama / Mistral / Qwen RMSNorm, installed on a model's RMSNorm modules
  by ``install_rms_norms`` only where the module's own forward gives the same result on a
  probe input (Gemma's ``1 + weight`` form, say, is left alone).

They serve recorded decode graphs only (``graphs.GraphedPagedRunner``: its decode step
calls the attention kernel, and the norms run it inside ``FusedKernels.recording()``):
a graph launches them at no host cost, while in an eager step each Triton launch costs
the host more than the torch ops it replaces (docs/engine.md has the numbers).

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
import os
import threading
import types
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["FusedKernels", "fused_kernels", "install_rms_norms", "reference_decode_attention"]

log = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
    """Both kernels on small inputs on ``device`` (GQA, rows of 1 and of more than one
    tile of keys, decode rows that are not the first packed tokens) against the torch
    references; raises ``AssertionError`` on a mismatch."""
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


@functools.cache
def fused_kernels(device: torch.device, dtype: torch.dtype) -> FusedKernels | None:
    """The kernels for ``dtype`` on ``device`` after a self-test there, or ``None`` (not
    CUDA, triton missing, ``FLORA_TRITON=0``, or it fails to compile or to match: logged
    once, and the torch paths serve)."""
    if device.type != "cuda" or dtype not in _DTYPES or os.environ.get("FLORA_TRITON", "1") == "0":
        return None
    try:
        from flora_server.engine.paged import _fused_triton

        kernels = FusedKernels(_fused_triton)
        self_test(kernels, device, dtype)
    except ImportError:
        return None
    except Exception as exc:  # a compiler or driver error, or a wrong result
        log.warning("fused decode kernels disabled on %s (%s): %s", device, dtype, exc)
        return None
    return kernels


def install_rms_norms(model: torch.nn.Module, kernels: FusedKernels) -> int:
    """Serve every RMSNorm module of ``model`` through ``kernels.rms_norm`` inside
    ``kernels.recording()``, where the kernel gives what the module's own forward gives
    on a probe input (the same values in its dtype, to a rounding of the float32
    statistics); returns how many. Idempotent: a module already served keeps its
    forward."""
    installed = 0
    checked: dict[type, bool] = {}
    for module in model.modules():
        if not type(module).__name__.endswith("RMSNorm") or "forward" in vars(module):
            continue
        eps = _eps_of(module)
        weight = getattr(module, "weight", None)
        if eps is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            continue
        kind = type(module)
        if kind not in checked:
            checked[kind] = _same_as_module(module, kernels, weight, eps)
            if not checked[kind]:
                log.info("%s keeps its own forward: the fused RMSNorm differs", kind.__name__)
        if checked[kind]:
            module.forward = _GraphNorm(kernels, weight, eps, module.forward)
            installed += 1
    return installed


def _eps_of(module: torch.nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float) and math.isfinite(value):
            return value
    return None


@torch.inference_mode()
def _same_as_module(
    module: torch.nn.Module, kernels: FusedKernels, weight: torch.Tensor, eps: float
) -> bool:
    gen = torch.Generator().manual_seed(0)
    probe = (torch.randn(4, weight.shape[0], generator=gen) * 3).to(weight.device, weight.dtype)
    want: Any = module(probe)
    got = kernels.rms_norm(probe, weight, eps)
    if not isinstance(want, torch.Tensor) or want.shape != got.shape or want.dtype != got.dtype:
        return False
    tol = 1e-5 if weight.dtype == torch.float32 else 1e-2
    return bool(torch.allclose(got.float(), want.float(), rtol=tol, atol=tol))
