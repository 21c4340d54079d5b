"""Sibling projections computed by one GEMM: projections that read one input (q/k/v,
gate/up: ``ServingPolicy.shared_inputs``) whose weights are consecutive row blocks of one
tensor. Then ``x @ W^T`` over that tensor is every sibling's output side by side, each a
column slice, in one launch where each projection would take one of its own.

vLLM's ``QKVParallelLinear`` and ``MergedColumnParallelLinear`` hold such weights from the
start. Here the model's own modules keep their weights, as views into the shared tensor
(``share_storage``), so everything that reads or writes a weight by module (an adapter
merged in place, the host copy that restores it, a checkpoint) works unchanged; whoever
computes the siblings at once checks first that their weights still are one tensor
(``concatenated``: a module whose weight was re-bound since, by ``.to()`` say, is not).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["Concatenated", "concatenated", "share_storage"]


class Concatenated(NamedTuple):
    """``weight``: ``[sum of outs, in]``, the siblings' weights as consecutive row blocks
    (a view of their storage); ``columns``: each sibling's (first, end) column of
    ``x @ weight^T``, in the order the weights were given."""

    weight: torch.Tensor
    columns: list[tuple[int, int]]


def concatenated(weights: Sequence[torch.Tensor]) -> Concatenated | None:
    """The tensor ``weights`` (``[out_i, in]`` each, in any order) are consecutive row
    blocks of, or ``None`` where they are not: two or more contiguous matrices of one
    width and dtype on one storage, each starting where another ends."""
    if len(weights) < 2:
        return None
    first = weights[0]
    if any(
        w.dim() != 2
        or not w.is_contiguous()
        or w.shape[1] != first.shape[1]
        or w.dtype != first.dtype
        or w.device != first.device
        or w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
        for w in weights
    ):
        return None
    order = sorted(range(len(weights)), key=lambda i: weights[i].storage_offset())
    start = weights[order[0]].storage_offset()
    width, rows = first.shape[1], 0
    columns: list[tuple[int, int]] = [(0, 0)] * len(weights)
    for i in order:
        if weights[i].storage_offset() != start + rows * width:
            return None
        columns[i] = (rows, rows + weights[i].shape[0])
        rows += weights[i].shape[0]
    weight = weights[order[0]].detach().as_strided((rows, width), (width, 1), start)
    return Concatenated(weight, columns)


def share_storage(linears: Sequence[nn.Linear]) -> Concatenated | None:
    """Make the weights of ``linears`` consecutive row blocks of one new tensor (in this
    order; their values unchanged), so ``concatenated`` finds them; returns it. ``None``
    (nothing changed) unless they are two or more bias-free linear layers of one input
    width, dtype and device. Weights that already are one tensor stay where they are."""
    weights = [lin.weight for lin in linears]
    if len(linears) < 2 or any(lin.bias is not None for lin in linears):
        return None
    if any(w.dim() != 2 or w.shape[1] != weights[0].shape[1] for w in weights):
        return None
    if len({(w.dtype, w.device) for w in weights}) != 1:
        return None
    found = concatenated(weights)
    if found is not None:
        return found
    # Not an inference tensor, whatever the caller's mode: merging an adapter writes into
    # these weights in place, outside inference mode.
    with torch.inference_mode(False), torch.no_grad():
        shared = torch.cat([w.detach() for w in weights])
        first = 0
        for lin in linears:
            rows = lin.weight.shape[0]
            lin.weight.data = shared[first : first + rows]
            first += rows
    return concatenated(weights)
