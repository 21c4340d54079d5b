"""New classification heads and the module selection shared by the classifier recipes."""

from __future__ import annotations

import torch
from torch import nn

from flora.train.errors import TrainError

HEAD_NAME = "classifier"


def replace_head(model: nn.Module, num_labels: int, name: str = HEAD_NAME) -> nn.Linear:
    """Put a freshly initialised ``nn.Linear(in_features, num_labels)`` at ``name``.

    The new head takes torch's default Linear init from the global RNG (seeded by the
    caller), so a run is reproducible."""
    old = getattr(model, name, None)
    if not isinstance(old, nn.Linear):
        raise TrainError(f"the base has no nn.Linear {name!r} to replace with a new head")
    head = nn.Linear(old.in_features, num_labels, device=old.weight.device, dtype=old.weight.dtype)
    setattr(model, name, head)
    return head


def attach_head(
    model: nn.Module, in_features: int, num_labels: int, name: str = HEAD_NAME
) -> nn.Linear:
    """Add a new ``nn.Linear(in_features, num_labels)`` as submodule ``name`` of a model
    that has none (a bare encoder): the head travels with the adapter as a train module,
    and a fresh base gets the same placeholder before ``apply_adapter``."""
    if hasattr(model, name):
        raise TrainError(f"the base already has a submodule {name!r}")
    param = next(model.parameters())
    head = nn.Linear(in_features, num_labels, device=param.device, dtype=param.dtype)
    model.add_module(name, head)
    return head


def adaptable_names(
    model: nn.Module, kinds: tuple[type[nn.Module], ...], exclude: str
) -> list[str]:
    """Qualified names of every module of one of ``kinds``, except ``exclude`` and its
    children (the head, which is trained fully instead)."""
    return [
        n
        for n, m in model.named_modules()
        if n and isinstance(m, kinds) and n != exclude and not n.startswith(exclude + ".")
    ]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the label: logits [N, C], labels [N]."""
    return float((logits.argmax(dim=-1) == labels).float().mean().item())


def freeze_batchnorm(model: nn.Module) -> None:
    """Train mode everywhere except batch norm, whose running statistics belong to the
    frozen base (an adapter file cannot carry them)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
