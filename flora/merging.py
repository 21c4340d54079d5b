"""Merging several FLoRA adapters of one base into one adapter (LoRAX's `merged_adapters`).

Linear merge, exact, in FLoRA's own space. For a module adapted by adapters i = 1..k,
``dW_i = s_i G_i x_1 U_1^i ... x_N U_N^i``. The weighted sum ``sum_i w_i dW_i`` is again a
Tucker tensor, with the factors concatenated along the rank axis and the cores placed on the
block diagonal (each block scaled by ``w_i s_i``):

    U_m = [U_m^1 | ... | U_m^k]            (d_m, sum_i r_m^i)
    G   = blockdiag(w_1 s_1 G_1, ..., w_k s_k G_k)         s = 1

(the cross blocks of G are zero, so every cross term ``U^i ... U^j`` vanishes). Ranks add
up; a mode whose summed rank exceeds its size d_m is compressed exactly by a QR
factorisation ``U_m = Q R`` (``Q`` is ``(d_m, d_m)``, ``R`` is folded into the core along
that mode). It is *not* the merge of same-rank Tucker factors (a sum of Tucker tensors of
ranks r is in general not a Tucker tensor of ranks r).

TIES (Yadav et al. 2023) and DARE (Yu et al. 2024) act element-wise, so they are computed on
the dense update of each 2-mode module (``dW_i`` as its weight-shaped matrix), exactly as
PEFT's `merge_utils` computes them on task tensors:

- ties: keep the ``density`` fraction of largest-magnitude entries of each ``dW_i``, elect a
  sign per entry (``total``: sign of ``sum_i dW_i``; ``frequency``: the majority of signs),
  and average the weighted entries that agree with it;
- dare_linear: drop each entry with probability ``1 - density`` and rescale the rest by
  ``1 / density`` (a seeded generator, so a merge is reproducible), then the weighted sum;
- dare_ties: DARE's random drop and rescale, then TIES's sign election and disjoint mean.

The result is a dense matrix, generally of full rank, so it is stored as its best
approximation of rank ``R = min(sum_i r_i, max_rank, min(d_0, d_1))`` (truncated SVD,
Eckart-Young): exact whenever the merged matrix has rank <= R, otherwise the smallest
possible error at that rank. Modules of 3 or more modes (conv) are refused for TIES/DARE.
Elements adapted by only some of the adapters count the others as zero updates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from flora.adapter import Adapter, AdapterModule, core_key, factor_key
from flora.adapter.schema import DEFAULT_MAX_RANK
from flora.config import FloraConfig
from flora.errors import AdapterError, RankLimitError
from flora.tucker import mode_product, reconstruct

__all__ = ["MergeStrategy", "merge_adapters"]

MergeStrategy = Literal["linear", "ties", "dare_linear", "dare_ties"]
SignMethod = Literal["total", "frequency"]


def merge_adapters(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    *,
    strategy: MergeStrategy = "linear",
    density: float = 1.0,
    majority_sign_method: SignMethod = "total",
    seed: int = 0,
    max_rank: int = DEFAULT_MAX_RANK,
) -> Adapter:
    """One adapter whose update is the chosen merge of ``adapters`` weighted by ``weights``
    (see the module docstring for the maths). ``seed`` drives DARE's random drop.

    Raises:
        AdapterError: no adapters, lengths differ, trained full modules, different bases,
        a module whose shape differs between adapters, conv modules under TIES/DARE, or
        (RankLimitError) a merged rank above ``max_rank``.
    """
    if not adapters or len(adapters) != len(weights):
        raise AdapterError(f"{len(adapters)} adapters and {len(weights)} weights")
    if not 0.0 < density <= 1.0:
        raise AdapterError(f"density must be in (0, 1], not {density}")
    fingerprints = {a.fingerprint for a in adapters if a.fingerprint is not None}
    if len(fingerprints) > 1:
        raise AdapterError("the adapters were made for different bases (fingerprints differ)")
    for adapter in adapters:
        if adapter.full_modules():
            raise AdapterError(
                f"module {adapter.full_modules()[0]!r} is saved whole; it cannot be merged"
            )
    names = sorted({n for a in adapters for n in a.layer_names()})
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, AdapterModule] = {}
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        parts = [(a, float(w)) for a, w in zip(adapters, weights, strict=True) if name in a.modules]
        specs = {a.modules[name].spec for a, _ in parts}
        if len(specs) > 1:
            raise AdapterError(f"module {name!r} has different shapes in the adapters")
        spec = specs.pop()
        if strategy == "linear":
            core, factors = _linear(parts, name)
        else:
            core, factors = _elementwise(
                parts, name, strategy, density, majority_sign_method, generator, max_rank
            )
        ranks = tuple(core.shape)
        if max(ranks) > max_rank:
            raise RankLimitError(
                f"module {name!r}: the merged ranks {list(ranks)} exceed {max_rank} "
                "(merge fewer or smaller adapters)"
            )
        tensors[core_key(name)] = core.float().contiguous()
        for m, u in enumerate(factors):
            tensors[factor_key(name, m)] = u.float().contiguous()
        modules[name] = AdapterModule(spec=spec, ranks=ranks)
    first = adapters[0]
    config = FloraConfig(
        target_modules=names,
        rank=max(max(m.ranks) for m in modules.values()),
        scale=1.0,
        rank_pattern={n: list(m.ranks) for n, m in modules.items()},
    )
    return Adapter(
        config=config,
        tensors=tensors,
        modules=modules,
        base_model_id=first.base_model_id,
        fingerprint=next(iter(fingerprints), None),
        task=first.task,
        metadata={"merge_strategy": strategy, "merge_weights": [float(w) for w in weights]},
    )


def _linear(
    parts: Sequence[tuple[Adapter, float]], name: str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Block-diagonal core and concatenated factors (float64), then exact QR compression of
    any mode whose summed rank exceeds its size."""
    cores = [a.core(name).double() * (w * a.config.scale) for a, w in parts]
    n_modes = cores[0].dim()
    factors = [
        torch.cat([a.factors(name)[m].double() for a, _ in parts], dim=1) for m in range(n_modes)
    ]
    shape = [sum(c.shape[m] for c in cores) for m in range(n_modes)]
    core = torch.zeros(shape, dtype=torch.float64)
    offset = [0] * n_modes
    for c in cores:
        core[tuple(slice(o, o + r) for o, r in zip(offset, c.shape, strict=True))] = c
        offset = [o + r for o, r in zip(offset, c.shape, strict=True)]
    for m, u in enumerate(factors):
        if u.shape[1] > u.shape[0]:  # more columns than rows: U = Q R exactly, Q square
            q, r = torch.linalg.qr(u, mode="reduced")
            factors[m] = q
            core = mode_product(core, r, m)
    return core, factors


def _elementwise(
    parts: Sequence[tuple[Adapter, float]],
    name: str,
    strategy: MergeStrategy,
    density: float,
    sign_method: SignMethod,
    generator: torch.Generator,
    max_rank: int,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    deltas, weights = [], []
    for adapter, w in parts:
        core = adapter.core(name).double()
        if core.dim() != 2:
            raise AdapterError(
                f"module {name!r} has {core.dim()} modes; {strategy} merges 2-mode modules "
                "(Linear, Conv1D, Embedding) only, use merge_strategy linear for conv"
            )
        factors = [u.double() for u in adapter.factors(name)]
        deltas.append(reconstruct(core, factors, adapter.config.scale))
        weights.append(w)
    merged = merge_dense(deltas, weights, strategy, density, sign_method, generator)
    budget = sum(adapter.modules[name].ranks[0] for adapter, _ in parts)
    rank = max(1, min(budget, max_rank, *merged.shape))
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    return torch.eye(rank, dtype=torch.float64), [u[:, :rank] * s[:rank], vh[:rank].T]


def merge_dense(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    strategy: MergeStrategy,
    density: float = 1.0,
    sign_method: SignMethod = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """TIES / DARE / linear merge of dense task tensors of one shape (PEFT's definitions,
    with DARE's rescale by 1 / density). deltas: k tensors of one shape -> that shape."""
    stacked = torch.stack(list(deltas))  # [k, ...]
    w = torch.tensor(weights, dtype=stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
    if strategy == "linear":
        return (stacked * w).sum(0)
    if strategy in ("dare_linear", "dare_ties"):
        keep = torch.rand(stacked.shape, generator=generator, dtype=torch.float64) < density
        stacked = stacked * keep / density
    elif strategy == "ties":
        stacked = torch.stack([_keep_largest(t, density) for t in stacked])
    if strategy == "dare_linear":
        return (stacked * w).sum(0)
    sign = stacked.sign()
    votes = stacked.sum(0) if sign_method == "total" else sign.sum(0)
    majority = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = sign == majority
    weighted = stacked * w * agree
    return weighted.sum(0) / agree.sum(0).clamp(min=1)


def _keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``int(density * numel)`` entries of largest magnitude."""
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=torch.bool)
    if k > 0:
        mask[t.abs().reshape(-1).topk(k).indices] = True
    return t * mask.reshape(t.shape)
