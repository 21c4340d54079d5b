"""What one slot holds for one module, and the folds the fast paths use.

A FLoRA update of a weight with modes ``(d_1..d_N)`` is

    dW = s * G x_1 U_1 x_2 U_2 ... x_N U_N         (G: (r_1..r_N), U_m: (d_m, r_m))

For the two-mode kinds (Linear, transformers Conv1D, Embedding) the core folds into one
factor, so the update on activations is a rank-``r`` product ``x -> (x @ A) @ B``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "TWO_MODE_KINDS",
    "ModuleFactors",
    "all_finite",
    "check_weight_shape",
    "fold_is_finite",
    "fold_two_mode",
    "fold_two_mode_many",
    "modules_from_adapter",
    "tucker_full",
]

# Kinds whose update folds to ``(x @ A) @ B`` (x: the input features or a one-hot id).
TWO_MODE_KINDS = frozenset({"linear", "hf_conv1d", "embedding"})
CONV_KINDS = frozenset({"conv1d", "conv2d", "conv3d"})


@dataclass(frozen=True)
class ModuleFactors:
    """One module's FLoRA tensors: ``dW = scale * core x_1 factors[0] ... x_N factors[N-1]``.

    Mode order is the base weight's own: Linear ``(out, in)``; ConvNd
    ``(out, in/groups, k_1..k_m)``; Embedding ``(num, dim)``; transformers Conv1D
    ``(in, out)``.
    """

    kind: str
    core: torch.Tensor
    factors: tuple[torch.Tensor, ...]
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in TWO_MODE_KINDS | CONV_KINDS:
            raise ValueError(f"unknown module kind {self.kind!r}")
        if len(self.factors) != self.core.dim():
            raise ValueError(
                f"{self.kind}: core has {self.core.dim()} modes, got {len(self.factors)} factors"
            )
        for m, (u, r) in enumerate(zip(self.factors, self.core.shape, strict=True)):
            if u.dim() != 2 or u.shape[1] != r:
                raise ValueError(
                    f"{self.kind}: factor {m} has shape {tuple(u.shape)}, core rank is {r}"
                )

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of ``dW`` (the base weight's shape)."""
        return tuple(int(u.shape[0]) for u in self.factors)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(int(r) for r in self.core.shape)


def tucker_full(core: torch.Tensor, factors: Sequence[torch.Tensor], scale: float) -> torch.Tensor:
    """``scale * core x_1 U_1 ... x_N U_N`` by successive mode products (tensordot)."""
    out = core
    for mode, u in enumerate(factors):
        out = torch.tensordot(out, u, dims=([mode], [1])).movedim(-1, mode)
    return out * scale


def fold_two_mode(mf: ModuleFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a two-mode update into ``A: (n_in, r)`` and ``B: (r, n_out)``.

    Written with the input-side factor ``U_i: (n_in, r_i)``, the output-side factor
    ``U_o: (n_out, r_o)`` and the core oriented input -> output ``C: (r_i, r_o)``, the
    update on activations is ``x -> s * x U_i C U_o^T``. The core joins the side with
    the larger rank, so the kept rank is ``r = min(r_i, r_o)``:

        r_i <= r_o:  A = U_i,       B = s * C U_o^T
        r_i >  r_o:  A = U_i C,     B = s * U_o^T

    Linear stores ``(out, in)``, so ``U_i = U_1``, ``U_o = U_0``, ``C = G^T``; Conv1D
    (``(in, out)``) and Embedding (``(num, dim)``, ``x`` one-hot over ids) use
    ``U_i = U_0``, ``U_o = U_1``, ``C = G``. Computed in float32.
    """
    core = mf.core.float()
    u0, u1 = (u.float() for u in mf.factors)
    if mf.kind == "linear":
        u_in, u_out, c = u1, u0, core.t()
    elif mf.kind in ("hf_conv1d", "embedding"):
        u_in, u_out, c = u0, u1, core
    else:
        raise ValueError(f"fold_two_mode: {mf.kind} is not a two-mode kind")
    if c.shape[0] <= c.shape[1]:
        return u_in, mf.scale * (c @ u_out.t())
    return u_in @ c, mf.scale * u_out.t()


def _fold_orientation(
    mf: ModuleFactors,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_in, U_out, C)`` of ``fold_two_mode``'s docstring (float32, ``C`` may be a view)."""
    core = mf.core.float()
    u0, u1 = (u.float() for u in mf.factors)
    if mf.kind == "linear":
        return u1, u0, core.t()
    if mf.kind in ("hf_conv1d", "embedding"):
        return u0, u1, core
    raise ValueError(f"fold_two_mode: {mf.kind} is not a two-mode kind")


def fold_two_mode_many(
    items: Sequence[ModuleFactors],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[fold_two_mode(mf) for mf in items]`` with one batched matmul per group of equal
    shapes (e.g. the 30 ``q_proj`` of a llama adapter), not one small matmul per module.

    Same maths as ``fold_two_mode`` (``bmm`` of the stacked cores and output factors, then
    the scale). Why: one tiny BLAS call per projection made loading an adapter mostly
    waiting, as each call may wait for the intra-op threads on a busy machine; a handful of
    ``bmm`` calls do the same arithmetic. Results may be views of a stacked
    tensor (callers copy them into their slots).
    """
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(items)
    groups: dict[tuple, list[int]] = {}
    oriented = [_fold_orientation(mf) for mf in items]
    for i, (mf, (u_in, u_out, _)) in enumerate(zip(items, oriented, strict=True)):
        key = (tuple(u_in.shape), tuple(u_out.shape), u_in.device, float(mf.scale))
        groups.setdefault(key, []).append(i)
    for (_, _, _, scale), index in groups.items():
        c0 = oriented[index[0]][2]
        core_first = c0.shape[0] <= c0.shape[1]
        if len(index) == 1:
            out[index[0]] = fold_two_mode(items[index[0]])
            continue
        cs = torch.stack([oriented[i][2] for i in index])  # (G, r_i, r_o)
        if core_first:  # A = U_in, B = s C U_o^T (the scale goes on the small cores)
            u_outs = torch.stack([oriented[i][1] for i in index])  # (G, n_out, r_o)
            bs = torch.bmm(cs.mul_(scale) if scale != 1.0 else cs, u_outs.transpose(1, 2))
            for j, i in enumerate(index):
                out[i] = (oriented[i][0], bs[j])
        else:  # A = U_in C, B = s U_o^T
            u_ins = torch.stack([oriented[i][0] for i in index])  # (G, n_in, r_i)
            as_ = torch.bmm(u_ins, cs)
            for j, i in enumerate(index):
                out[i] = (as_[j], scale * oriented[i][1].t())
    return [o for o in out if o is not None]


def fold_is_finite(items: Sequence[ModuleFactors]) -> bool:
    """Whether every ``fold_two_mode(mf)`` of finite ``items`` is finite, without folding.

    A folded entry is a row of the core times a factor, scaled: at most ``|s| * max_i
    sum_k |C_ik| * max |U|`` in magnitude, and so at most ``|s| * sum |C| * max |U|``
    (the whole core's absolute sum bounds any of its row sums). When that bound stays
    below ``1e38`` (float32 overflows past ``3.4e38``; the margin covers rounding) for
    every module, the folds are finite. The bound costs a few fused reductions over all
    modules' tensors at once (``torch._foreach_*``, as ``clip_grad_norm_`` uses them: no
    op per module, no matrix products, which on CPU each wake the intra-op thread pool);
    when it does not hold, the folds are computed and checked exactly. Non-finite inputs
    give ``False``.
    """
    if not items:
        return True
    cores: list[torch.Tensor] = []
    folded_with: list[torch.Tensor] = []  # the factor the core multiplies
    stored: list[torch.Tensor] = []  # the factor stored as it is
    for mf in items:
        u_in, u_out, c = _fold_orientation(mf)
        core_first = c.shape[0] <= c.shape[1]  # as fold_two_mode: B = s C U_o^T, else A = U_in C
        cores.append(c)
        folded_with.append(u_out if core_first else u_in)
        stored.append(u_in if core_first else u_out)
    n = len(items)
    scale = torch.tensor([abs(mf.scale) for mf in items], device=cores[0].device)
    core_sum = torch.stack(torch._foreach_norm(cores, 1))
    peaks = torch.stack(torch._foreach_max(torch._foreach_abs(folded_with + stored)))
    bound = torch.cat([core_sum * peaks[:n] * scale, peaks[n:] * scale])
    if bool((bound < 1e38).all()):  # False for NaN too
        return True
    return all_finite(t for ab in fold_two_mode_many(items) for t in ab)


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """``all(isfinite(t).all() for t in tensors)``, in two ops for the common case.

    A float sum is non-finite whenever any term is (``inf`` and ``NaN`` propagate, ``inf -
    inf`` is ``NaN``), so finite per-tensor sums prove every element finite. A non-finite
    sum may also be an overflow of finite values, so only then is each tensor checked
    element by element: the answer is always exact.
    """
    tensors = list(tensors)
    if not tensors:
        return True
    sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors])
    if bool(torch.isfinite(sums).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def modules_from_adapter(adapter: Any) -> dict[str, ModuleFactors]:
    """Read a ``flora.Adapter`` into ``{module name: ModuleFactors}``.

    Adapters with ``train_modules`` saved whole (e.g. a new classifier head) are refused:
    a module replaced wholesale cannot be shared per row (its output shape may differ).
    """
    full = adapter.full_modules() if hasattr(adapter, "full_modules") else []
    if full:
        raise ValueError(
            f"adapter replaces whole modules {full}: not servable per row "
            "(apply it with flora.apply_adapter on a dedicated model instead)"
        )
    scale = float(adapter.config.scale)
    out: dict[str, ModuleFactors] = {}
    for name in adapter.layer_names():
        entry = adapter.modules[name]
        kind = entry.spec.kind if hasattr(entry, "spec") else entry.kind
        out[name] = ModuleFactors(
            kind=str(kind),
            core=adapter.core(name),
            factors=tuple(adapter.factors(name)),
            scale=scale,
        )
    return out


def check_weight_shape(name: str, mf: ModuleFactors, weight_shape: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``mf`` builds an update shaped like the base weight."""
    if tuple(weight_shape) != mf.weight_shape:
        raise ValueError(
            f"{name}: adapter update has shape {mf.weight_shape}, base weight {tuple(weight_shape)}"
        )
