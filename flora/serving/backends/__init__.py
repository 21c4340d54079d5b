"""Kernel backends for per-row and per-segment adapter updates, behind one ``select``.

Each backend is one module implementing ``Backend`` (``base.py``): the capability check
(``load``, self-test included), the plan for one routing (``build_plan``), the plan for
one token-segment routing (``build_segment_plan``, SGMV) and sharing work between sibling
projections (``share``). ``select`` returns the first of ``BACKENDS`` that
loads for a module's device and dtype under the policy; the torch backend, last, serves
everything. A new backend is one module here and one entry in ``BACKENDS``.

- ``numba_cpu``: float32 on the CPU, the fused numba row kernel (BGMV style); its
  segment form in ``numba_segments``.
- ``triton_gpu``: CUDA, the Triton row kernel (SGMV/BGMV style), after a self-test.
- ``torch_paths``: two small matmuls ("wide" or "rows"); the fallback (autograd, other
  dtypes) and the reference the kernels are tested against.
"""

from __future__ import annotations

import torch

from flora.serving.backends.base import Backend, PerInput, RowTarget
from flora.serving.backends.numba_cpu import NumbaBackend
from flora.serving.backends.torch_paths import TorchBackend
from flora.serving.backends.triton_gpu import TritonBackend
from flora.serving.base import ServingPolicy

__all__ = ["BACKENDS", "Backend", "PerInput", "RowTarget", "select"]

BACKENDS: list[type[Backend]] = [NumbaBackend, TritonBackend, TorchBackend]
"""First match wins; ``TorchBackend`` always loads, so it stays last."""


def select(policy: ServingPolicy, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend for a module of ``dtype`` on ``device`` under ``policy``."""
    for cls in BACKENDS:
        backend = cls.load(policy, device, dtype)
        if backend is not None:
            return backend
    raise LookupError(f"no kernel backend for {dtype} on {device}")
