"""FLoRA on ``nn.Embedding``, weight ``(num, dim)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flora.kinds import ModuleSpec, weight_of
from flora.layers.base import FloraLayer

__all__ = ["FloraEmbedding"]


class FloraEmbedding(FloraLayer):
    """``dW = s * U_num G U_dim^T``; looked up as ``s * (U_num[ids] G) U_dim^T``.

    Dropout does not apply: the input is integer ids, and dropping ids is not the
    adapter-branch dropout the method means. Embeddings with ``max_norm`` are refused at
    dispatch because their forward renormalises the weight in place, which breaks
    ``forward == lookup in W + dW``.
    """

    kind = "embedding"

    @classmethod
    def spec_of(cls, module: nn.Module) -> ModuleSpec:
        return ModuleSpec("embedding", tuple(weight_of(module).shape))

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        # ids: [...] -> [..., dim]
        u_num, u_dim = self.factors
        rows = F.embedding(x, u_num)  # [..., r_num]
        return ((rows @ self.core) @ u_dim.T) * self.scale
