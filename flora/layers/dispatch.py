"""Which wrapper class adapts which module: a short list, first match wins."""

from __future__ import annotations

import sys
from collections.abc import Callable

from torch import nn

from flora.fingerprint import ModuleSpec
from flora.layers.base import FloraLayer
from flora.layers.conv import FloraConv
from flora.layers.embedding import FloraEmbedding
from flora.layers.hf_conv1d import FloraHFConv1D
from flora.layers.linear import FloraLinear

__all__ = ["WRAPPERS", "module_spec", "wrapper_for"]


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers is optional: if it was never imported, no module can be its Conv1D.
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def _is_plain_embedding(module: nn.Module) -> bool:
    # max_norm renormalises the weight in place on every lookup; W + dW would not hold.
    return isinstance(module, nn.Embedding) and module.max_norm is None


WRAPPERS: tuple[tuple[Callable[[nn.Module], bool], type[FloraLayer]], ...] = (
    (lambda m: isinstance(m, nn.Linear), FloraLinear),
    (lambda m: isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d), FloraConv),
    (_is_plain_embedding, FloraEmbedding),
    (_is_hf_conv1d, FloraHFConv1D),
)


def wrapper_for(module: nn.Module) -> type[FloraLayer] | None:
    """The wrapper class for ``module``, or None if FLoRA cannot adapt it."""
    if isinstance(module, FloraLayer):
        return None
    return next((cls for accepts, cls in WRAPPERS if accepts(module)), None)


def module_spec(module: nn.Module) -> ModuleSpec | None:
    """``ModuleSpec`` of an adaptable module, None for anything else."""
    cls = wrapper_for(module)
    return None if cls is None else cls.spec_of(module)
