"""Pure helpers of the loop: learning-rate schedule, batch order, step count."""

from __future__ import annotations

import math

import torch


def total_steps(
    n_examples: int, batch_size: int, epochs: float | None, max_steps: int | None
) -> int:
    """Steps to run: ``max_steps`` if given, else ``ceil(epochs * ceil(n / batch))``."""
    if max_steps is not None:
        return max_steps
    per_epoch = math.ceil(n_examples / batch_size)
    return max(1, math.ceil((epochs or 1.0) * per_epoch))


def lr_at(step: int, total: int, base_lr: float, warmup: float) -> float:
    """Linear warm-up over the first ``w = ceil(warmup * total)`` steps, then cosine decay.

    lr(t) = base * (t + 1) / w                                  for t < w
    lr(t) = base * 0.5 * (1 + cos(pi * (t - w) / max(total - w, 1)))  otherwise
    """
    w = math.ceil(warmup * total)
    if step < w:
        return base_lr * (step + 1) / w
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(total - w, 1)))


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The example order of ``epoch``: a permutation that depends only on (seed, epoch),
    so a resumed run sees exactly the batches the uninterrupted run would have."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Example indices of global ``step``; an epoch is ``ceil(n / batch_size)`` steps and
    its last batch may be short."""
    per_epoch = math.ceil(n / batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = epoch_permutation(n, seed, epoch)
    return order[offset * batch_size : (offset + 1) * batch_size].tolist()
