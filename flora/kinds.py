"""The vocabulary of adaptable modules: their kinds, their specs, and the one table that
recognises a module's kind. A leaf: the layer wrappers, the served modules and the
fingerprint all read it, and it reads none of them."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn

__all__ = [
    "MODULE_KINDS",
    "ModuleKind",
    "ModuleSpec",
    "as_conv",
    "is_conv",
    "is_hf_conv1d",
    "is_linear",
    "is_plain_embedding",
    "module_kind",
    "weight_of",
]

ModuleKind = Literal["linear", "conv1d", "conv2d", "conv3d", "embedding", "hf_conv1d"]
MODULE_KINDS: tuple[str, ...] = get_args(ModuleKind)


@dataclass(frozen=True)
class ModuleSpec:
    """One adaptable module of a base.

    ``weight_shape`` is the base weight's own layout, which is also the mode order of the
    adapter: Linear ``(out, in)``; ConvNd ``(out, in/groups, k_1..k_m)``; Embedding
    ``(num, dim)``; transformers ``Conv1D`` ``(in, out)``.
    """

    kind: ModuleKind
    weight_shape: tuple[int, ...]
    groups: int = 1

    def __post_init__(self) -> None:
        if self.kind not in MODULE_KINDS:
            raise ValueError(f"unknown module kind {self.kind!r}; expected one of {MODULE_KINDS}")
        shape = tuple(self.weight_shape)
        if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(f"weight_shape must be positive integers, got {self.weight_shape!r}")
        expected = {"conv1d": 3, "conv2d": 4, "conv3d": 5}.get(self.kind, 2)
        if len(shape) != expected:
            raise ValueError(f"{self.kind} weight needs {expected} modes, got shape {shape}")
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"groups must be an integer >= 1, got {self.groups!r}")
        if self.groups != 1 and not self.kind.startswith("conv"):
            raise ValueError(f"groups={self.groups} only makes sense for convs, not {self.kind}")
        object.__setattr__(self, "weight_shape", shape)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"kind", "weight_shape": [..], "groups"}``."""
        return {"kind": self.kind, "weight_shape": list(self.weight_shape), "groups": self.groups}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModuleSpec:
        """Inverse of ``to_dict``; ValueError on missing/unknown keys or bad values.

        Extra keys used by the adapter format next to a spec (``ranks``) are ignored.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"ModuleSpec needs a mapping, got {type(d).__name__}")
        missing = {"kind", "weight_shape"} - set(d)
        if missing:
            raise ValueError(f"ModuleSpec is missing {', '.join(sorted(missing))}")
        shape = d["weight_shape"]
        if not isinstance(shape, list | tuple):
            raise ValueError(f"weight_shape must be a list, got {shape!r}")
        return cls(kind=d["kind"], weight_shape=tuple(shape), groups=d.get("groups", 1))


ConvNd = nn.Conv1d | nn.Conv2d | nn.Conv3d


def weight_of(module: nn.Module) -> torch.Tensor:
    """An adaptable module's weight, typed (``nn.Module`` attributes are dynamic)."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.weight is not a tensor")
    return weight


def as_conv(module: nn.Module) -> nn.Conv1d | nn.Conv2d | nn.Conv3d:
    """``module`` as the ConvNd it must be (TypeError otherwise)."""
    if not isinstance(module, ConvNd):
        raise TypeError(f"expected a Conv1d/2d/3d, got {type(module).__name__}")
    return module


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 style, weight ``(in, out)``). transformers is
    optional: if it was never imported, no module can be its ``Conv1D``."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def is_linear(module: nn.Module) -> bool:
    """A linear map ``y = x W^T + b``: ``nn.Linear`` or transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)  # ConvNd, any groups


def is_plain_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding`` without ``max_norm``, which renormalises the weight in place on
    every lookup, so ``W + dW`` would not hold: such embeddings are not adaptable."""
    return isinstance(module, nn.Embedding) and module.max_norm is None


_CONV_KINDS: dict[type[nn.Module], ModuleKind] = {
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.Conv3d: "conv3d",
}
# First match wins.
_KINDS: tuple[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], ModuleKind]], ...] = (
    (lambda m: isinstance(m, nn.Linear), lambda m: "linear"),
    (is_conv, lambda m: next(k for t, k in _CONV_KINDS.items() if isinstance(m, t))),
    (is_plain_embedding, lambda m: "embedding"),
    (is_hf_conv1d, lambda m: "hf_conv1d"),
)


def module_kind(module: nn.Module) -> ModuleKind | None:
    """The kind of an adaptable module; None for a module FLoRA cannot adapt."""
    return next((kind(module) for accepts, kind in _KINDS if accepts(module)), None)
