"""Layer wrappers: one file per layer kind, a shared base and the dispatch table."""

from flora.layers.base import FloraLayer
from flora.layers.conv import FloraConv
from flora.layers.dispatch import WRAPPERS, module_spec, wrapper_for
from flora.layers.embedding import FloraEmbedding
from flora.layers.hf_conv1d import FloraHFConv1D
from flora.layers.linear import FloraLinear

__all__ = [
    "WRAPPERS",
    "FloraConv",
    "FloraEmbedding",
    "FloraHFConv1D",
    "FloraLayer",
    "FloraLinear",
    "module_spec",
    "wrapper_for",
]
