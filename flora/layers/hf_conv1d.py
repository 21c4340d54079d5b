"""FLoRA on transformers' ``Conv1D`` (GPT-2 style linear with a transposed weight)."""

from __future__ import annotations

import torch
from torch import nn

from flora.kinds import ModuleSpec, weight_of
from flora.layers.base import FloraLayer
from flora.layers.linear import factored_matmul
from flora.tucker import fold_linear

__all__ = ["FloraHFConv1D"]


class FloraHFConv1D(FloraLayer):
    """transformers' ``Conv1D`` (GPT-2 style), weight stored ``(in, out)`` and applied as
    ``y = x W + b``; modes follow that layout: ``dW = s * U_in G U_out^T``."""

    kind = "hf_conv1d"

    @classmethod
    def spec_of(cls, module: nn.Module) -> ModuleSpec:
        return ModuleSpec("hf_conv1d", tuple(weight_of(module).shape))

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out];  x dW = s * ((x U_in) G) U_out^T
        u_in, u_out = self.factors
        x = self.dropout(x.to(self.core.dtype))
        return factored_matmul(x, u_in, self.core.T, u_out, self.scale)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_A (r, in), lora_B (out, r))`` for the equivalent ``nn.Linear`` weight
        ``dW^T`` (out, in), with ``dW^T = lora_B @ lora_A``."""
        u_in, u_out = self.factors
        return fold_linear(self.core.T, [u_out, u_in], self.scale)
