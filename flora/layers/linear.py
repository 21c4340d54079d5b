"""FLoRA on ``nn.Linear``, weight ``(out, in)`` (the 2-mode case)."""

from __future__ import annotations

import torch
from torch import nn

from flora.kinds import ModuleSpec, weight_of
from flora.layers.base import FloraLayer
from flora.tucker import fold_linear

__all__ = ["FloraLinear"]


class FloraLinear(FloraLayer):
    """``nn.Linear``, weight ``(out, in)``: ``dW = s * U_out G U_in^T`` (LoRA with an
    ``r_out x r_in`` core between the factors)."""

    kind = "linear"

    @classmethod
    def spec_of(cls, module: nn.Module) -> ModuleSpec:
        return ModuleSpec("linear", tuple(weight_of(module).shape))

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out];  x dW^T = s * ((x U_in) G^T) U_out^T
        u_out, u_in = self.factors
        return factored_matmul(
            self.dropout(x.to(self.core.dtype)), u_in, self.core, u_out, self.scale
        )

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_A (r, in), lora_B (out, r))`` with ``dW = lora_B @ lora_A``."""
        return fold_linear(self.core, list(self.factors), self.scale)


def factored_matmul(
    x: torch.Tensor, u_in: torch.Tensor, core: torch.Tensor, u_out: torch.Tensor, scale: float
) -> torch.Tensor:
    """``s * ((x U_in) G^T) U_out^T`` for x [..., in], U_in (in, r_in), G (r_out, r_in),
    U_out (out, r_out), in the cheaper of two exact orders.

    With many rows (training batches) the core folds into the input factor first,
    ``A = U_in G^T`` (in x r_out, ``in*r_in*r_out`` multiply-adds once), leaving LoRA's two
    matmuls over the rows; with few rows (decoding) the three thin matmuls are cheaper.
    The scale multiplies the small output factor, not the [..., out] result."""
    rows = x.numel() // max(x.shape[-1], 1)
    d_in, r_in = u_in.shape
    r_out = core.shape[0]
    three = rows * (d_in * r_in + r_in * r_out)
    folded = d_in * r_in * r_out + rows * d_in * r_out
    expand = (u_out * scale).T if scale != 1.0 else u_out.T  # [r_out, out]
    if folded < three:
        return (x @ (u_in @ core.T)) @ expand
    return ((x @ u_in) @ core.T) @ expand
