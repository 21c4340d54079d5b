"""Which wrapper class adapts which module: one wrapper per module kind."""

from __future__ import annotations

from torch import nn

from flora.kinds import ModuleKind, ModuleSpec, module_kind
from flora.layers.base import FloraLayer
from flora.layers.conv import FloraConv
from flora.layers.embedding import FloraEmbedding
from flora.layers.hf_conv1d import FloraHFConv1D
from flora.layers.linear import FloraLinear

__all__ = ["WRAPPERS", "module_spec", "wrapper_for"]


# One wrapper per module kind; which kind a module is, is flora.kinds' to say.
WRAPPERS: dict[ModuleKind, type[FloraLayer]] = {
    "linear": FloraLinear,
    "conv1d": FloraConv,
    "conv2d": FloraConv,
    "conv3d": FloraConv,
    "embedding": FloraEmbedding,
    "hf_conv1d": FloraHFConv1D,
}


def wrapper_for(module: nn.Module) -> type[FloraLayer] | None:
    """The wrapper class for ``module``, or None if FLoRA cannot adapt it."""
    if isinstance(module, FloraLayer):
        return None
    kind = module_kind(module)
    return None if kind is None else WRAPPERS[kind]


def module_spec(module: nn.Module) -> ModuleSpec | None:
    """``ModuleSpec`` of an adaptable module, None for anything else."""
    cls = wrapper_for(module)
    return None if cls is None else cls.spec_of(module)
