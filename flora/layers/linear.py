"""FLoRA on ``nn.Linear``, weight ``(out, in)`` (the 2-mode case)."""

from __future__ import annotations

import torch
from torch import nn

from flora.kinds import ModuleSpec
from flora.layers.base import FloraLayer
from flora.tucker import fold_linear

__all__ = ["FloraLinear"]


class FloraLinear(FloraLayer):
    """``nn.Linear``, weight ``(out, in)``: ``dW = s * U_out G U_in^T`` (LoRA with an
    ``r_out x r_in`` core between the factors)."""

    kind = "linear"

    @classmethod
    def spec_of(cls, module: nn.Module) -> ModuleSpec:
        return ModuleSpec("linear", tuple(module.weight.shape))

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out];  x dW^T = s * ((x U_in) G^T) U_out^T
        u_out, u_in = self.factors
        h = self.dropout(x.to(self.core.dtype)) @ u_in  # [..., r_in]
        return ((h @ self.core.T) @ u_out.T) * self.scale

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_A (r, in), lora_B (out, r))`` with ``dW = lora_B @ lora_A``."""
        return fold_linear(self.core, list(self.factors), self.scale)
