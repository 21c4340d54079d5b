"""Pure tensor functions for Tucker-form updates.

A Tucker tensor is a core ``G`` of shape ``(r_1, ..., r_N)`` and one factor per mode,
``U_m`` of shape ``(d_m, r_m)``. The full tensor is

    T = s * G x_1 U_1 x_2 U_2 ... x_N U_N,       T has shape (d_1, ..., d_N)

where ``x_m`` is the mode-m product (Kolda & Bader 2009):

    (X x_m U)[i_1, .., j, .., i_N] = sum_k X[i_1, .., k, .., i_N] * U[j, k].

Nothing here knows about modules; the layer wrappers and the adapter format build on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["fold_linear", "hosvd", "mode_product", "reconstruct", "unfold"]


def mode_product(x: torch.Tensor, u: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` product ``x x_mode u``.

    ``x``: any shape with ``x.shape[mode] == u.shape[1]``; ``u``: ``(d, r)``.
    Returns ``x`` with mode ``mode`` replaced by size ``d``.
    """
    if u.dim() != 2 or x.shape[mode] != u.shape[1]:
        raise ValueError(
            f"mode_product: mode {mode} of x has size {x.shape[mode]}, "
            f"factor has shape {tuple(u.shape)}"
        )
    # tensordot puts the new axis last; move it back to where the contracted mode was.
    return torch.tensordot(x, u, dims=([mode], [1])).movedim(-1, mode)


def reconstruct(
    core: torch.Tensor, factors: Sequence[torch.Tensor], scale: float = 1.0
) -> torch.Tensor:
    """Full tensor ``scale * core x_1 U_1 ... x_N U_N`` (shape ``(d_1, ..., d_N)``)."""
    if len(factors) != core.dim():
        raise ValueError(f"reconstruct: core has {core.dim()} modes, got {len(factors)} factors")
    out = core
    for mode, u in enumerate(factors):
        out = mode_product(out, u, mode)
    return out * scale if scale != 1.0 else out


def unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: ``(d_mode, prod of the other sizes)``."""
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)


def hosvd(tensor: torch.Tensor, ranks: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Truncated higher-order SVD: ``tensor ~= core x_1 U_1 ... x_N U_N``.

    ``U_m`` holds the ``ranks[m]`` leading left singular vectors of the mode-m unfolding
    (orthonormal columns), and ``core = tensor x_1 U_1^T ... x_N U_N^T``. Exact when the
    tensor's multilinear rank is at most ``ranks``; otherwise quasi-optimal (within
    sqrt(N) of the best Tucker approximation). Used to compress a dense update into
    FLoRA form or to re-rank an adapter.

    The leading vectors come from an eigendecomposition of the ``(d_m, d_m)`` Gram matrix
    in float64 (never an SVD of the huge unfolding), so ``ranks[m]`` may go up to ``d_m``
    even when the unfolding has fewer columns. Outputs have ``tensor``'s dtype.
    """
    if len(ranks) != tensor.dim():
        raise ValueError(f"hosvd: tensor has {tensor.dim()} modes, got ranks {tuple(ranks)}")
    for mode, (r, d) in enumerate(zip(ranks, tensor.shape, strict=True)):
        if not 1 <= r <= d:
            raise ValueError(f"hosvd: rank {r} of mode {mode} must be in [1, {d}]")
    t64 = tensor.detach().to(torch.float64)
    factors: list[torch.Tensor] = []
    for mode, r in enumerate(ranks):
        a = unfold(t64, mode)
        # eigh returns ascending eigenvalues; the last r columns span the leading subspace.
        _, vecs = torch.linalg.eigh(a @ a.T)
        factors.append(vecs[:, -r:].flip(-1))
    core = t64
    for mode, u in enumerate(factors):
        core = mode_product(core, u.T, mode)
    return core.to(tensor.dtype), [u.to(tensor.dtype) for u in factors]


def fold_linear(
    core: torch.Tensor, factors: Sequence[torch.Tensor], scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a 2-mode Tucker update into PEFT's two-matrix LoRA form.

    For ``core`` G ``(r_0, r_1)`` and factors ``U_0 (d_0, r_0)``, ``U_1 (d_1, r_1)``:

        dW = s * U_0 G U_1^T = lora_B @ lora_A,
        lora_A = U_1^T            shape (r_1, d_1)
        lora_B = s * U_0 G        shape (d_0, r_1)

    i.e. the rank is ``r = r_1`` (the input-side rank) and the scale is folded into
    ``lora_B``, so a PEFT adapter built from it needs ``lora_alpha == r`` (scaling 1).
    For ``nn.Linear`` (weight ``(out, in)``) this is directly PEFT's ``lora_A.weight``
    ``(r, in)`` and ``lora_B.weight`` ``(out, r)``. For transformers' ``Conv1D``, whose
    weight is stored ``(in, out)``, fold the transposed update instead:
    ``fold_linear(core.T, [factors[1], factors[0]], scale)``.
    """
    if core.dim() != 2 or len(factors) != 2:
        raise ValueError(f"fold_linear needs a 2-mode core, got shape {tuple(core.shape)}")
    u0, u1 = factors
    lora_a = u1.T.contiguous()
    lora_b = (u0 @ core) * scale
    return lora_a, lora_b
