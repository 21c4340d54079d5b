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

__all__ = ["Concatenated", "concatenated", "joint_of", "share_storage"]


class Concatenated(NamedTuple):
    """``weight``: ``[sum of outs, in]``, the siblings' weights as consecutive row blocks
    (a view of their storage); ``columns``: each sibling's (first, end) column of
    ``x @ weight^T``, in the order the weights were given; ``bias``: their biases laid out
    the same way (a view), or ``None`` for bias-free siblings."""

    weight: torch.Tensor
    columns: list[tuple[int, int]]
    bias: torch.Tensor | None = None


def concatenated(
    weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None = None
) -> Concatenated | None:
    """The tensor ``weights`` (``[out_i, in]`` each, in any order) are consecutive row
    blocks of, or ``None`` where they are not: two or more contiguous matrices of one
    width and dtype on one storage, each starting where another ends; with ``biases``
    (one per weight), those too, in the weights' order."""
    if len(weights) < 2 or (biases is not None and len(biases) != len(weights)):
        return None
    order = sorted(range(len(weights)), key=lambda i: weights[i].storage_offset())
    found = _blocks(list(weights), order)
    if found is None:
        return None
    weight, columns = found
    if biases is None:
        return Concatenated(weight, columns)
    if any(b.dim() != 1 or b.shape[0] != w.shape[0] for b, w in zip(biases, weights, strict=True)):
        return None
    joint = _blocks([b.view(-1, 1) for b in biases], order)
    if joint is None or joint[1] != columns:
        return None
    return Concatenated(weight, columns, joint[0].view(-1))


def _blocks(
    parts: Sequence[torch.Tensor], order: list[int]
) -> tuple[torch.Tensor, list[tuple[int, int]]] | None:
    """``parts`` (``[rows_i, width]``, contiguous, one width and dtype on one storage) as
    consecutive row blocks of one tensor in ``order``: that tensor (a view) and each
    part's (first, end) row, or ``None``."""
    first = parts[0]
    if any(
        p.dim() != 2
        or not p.is_contiguous()
        or p.shape[1] != first.shape[1]
        or p.dtype != first.dtype
        or p.device != first.device
        or p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
        for p in parts
    ):
        return None
    start = parts[order[0]].storage_offset()
    width, rows = first.shape[1], 0
    spans: list[tuple[int, int]] = [(0, 0)] * len(parts)
    for i in order:
        if parts[i].storage_offset() != start + rows * width:
            return None
        spans[i] = (rows, rows + parts[i].shape[0])
        rows += parts[i].shape[0]
    return parts[order[0]].detach().as_strided((rows, width), (width, 1), start), spans


def joint_of(linears: Sequence[nn.Linear]) -> Concatenated | None:
    """The weights of ``linears`` as one tensor, and their biases as another
    (``concatenated``), or ``None``: also where some have a bias and some not."""
    biases: list[torch.Tensor] = [lin.bias for lin in linears if lin.bias is not None]
    # some with a bias: fewer biases than weights, which `concatenated` refuses
    return concatenated([lin.weight for lin in linears], biases or None)


def share_storage(linears: Sequence[nn.Linear]) -> Concatenated | None:
    """Make the weights of ``linears`` (and their biases) consecutive row blocks of one
    new tensor each (in this order; their values unchanged), so ``concatenated`` finds
    them; returns it. ``None`` (nothing changed) unless they are two or more linear
    layers of one input width, dtype and device, all with a bias or none. Weights that
    already are one tensor stay where they are."""
    weights = [lin.weight for lin in linears]
    biases: list[torch.Tensor] = [lin.bias for lin in linears if lin.bias is not None]
    if len(linears) < 2 or len(biases) not in (0, len(linears)):
        return None
    if any(w.dim() != 2 or w.shape[1] != weights[0].shape[1] for w in weights):
        return None
    if len({(t.dtype, t.device) for t in weights + biases}) != 1:
        return None
    found = joint_of(linears)
    if found is not None:
        return found
    # Not an inference tensor, whatever the caller's mode: merging an adapter writes into
    # these weights in place, outside inference mode.
    with torch.inference_mode(False), torch.no_grad():
        for name, parts in (("weight", weights), ("bias", biases)):
            if not parts:
                continue
            shared = torch.cat([p.detach() for p in parts])
            first = 0
            for lin in linears:
                rows = lin.weight.shape[0]
                getattr(lin, name).data = shared[first : first + rows]
                first += rows
    return joint_of(linears)
