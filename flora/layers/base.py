"""FloraLayer: the shared part of every wrapper (parameters, delta, merge, unmerge)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from flora.errors import NonFiniteError
from flora.kinds import ModuleKind, ModuleSpec, weight_of
from flora.tucker import reconstruct

__all__ = ["FloraLayer"]


class FloraLayer(nn.Module):
    """Wraps a frozen base layer with the update ``dW = s * G x_1 U_1 ... x_N U_N``.

    Modes follow the base weight's own layout (see ``ModuleSpec``). The core ``G`` starts
    at zero, so ``dW = 0`` before training; factors start kaiming-normal. Subclasses set
    ``kind`` and implement ``spec_of`` and ``adapter_forward`` (the update applied on
    activations, never materialising ``dW`` per call unless their docstring says why).

    ``merge`` folds ``dW`` into the base weight after keeping a host copy of it;
    ``unmerge`` copies that copy back, so the base is restored bitwise however many times
    one cycles. While merged, or while ``enabled`` is False, forward is the base layer.
    """

    kind: ModuleKind

    def __init__(
        self,
        base_layer: nn.Module,
        ranks: Sequence[int],
        scale: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.spec = self.spec_of(base_layer)
        shape = self.spec.weight_shape
        ranks = tuple(int(r) for r in ranks)
        if len(ranks) != len(shape) or any(
            not 1 <= r <= d for r, d in zip(ranks, shape, strict=True)
        ):
            raise ValueError(f"ranks {ranks} do not fit a {self.kind} weight of shape {shape}")
        weight = self.base_weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.core = nn.Parameter(torch.zeros(ranks, device=weight.device, dtype=dtype))
        self.factors = nn.ParameterList(
            nn.Parameter(torch.empty(d, r, device=weight.device, dtype=dtype))
            for d, r in zip(shape, ranks, strict=True)
        )
        for u in self.factors:
            nn.init.kaiming_normal_(u)
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged = False
        self._host_weight: torch.Tensor | None = None

    # -- subclass hooks -------------------------------------------------------------

    @classmethod
    def spec_of(cls, module: nn.Module) -> ModuleSpec:
        """The ``ModuleSpec`` of a base module this class wraps."""
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter branch: what ``dW`` adds to the base output for input ``x``."""
        raise NotImplementedError

    # -- shared behaviour -----------------------------------------------------------

    @property
    def base_weight(self) -> torch.Tensor:
        return weight_of(self.base_layer)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(self.core.shape)

    def delta_weight(self) -> torch.Tensor:
        """``dW = s * G x_1 U_1 ... x_N U_N``, shaped like the base weight."""
        with self.factor_precision():
            return reconstruct(self.core, list(self.factors), self.scale)

    def factor_precision(self) -> torch.autocast:
        """Autocast off for products of the adapter's own small tensors (core, factors):
        under a bf16/fp16 autocast, a chain of mode products would otherwise mix dtypes
        (each matmul's output in low precision, the next factor in float32), and rounding
        the folded weights costs precision for no speed."""
        return torch.autocast(self.core.device.type, enabled=False)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable adapter tensors: core then factors in mode order."""
        return [self.core, *self.factors]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.merged or not self.enabled:
            return out
        return out + self.adapter_forward(x).to(out.dtype)

    def original_weight(self) -> torch.Tensor:
        """The base weight without the update (the host copy while merged)."""
        if self.merged:
            assert self._host_weight is not None
            return self._host_weight
        return self.base_weight.detach()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``dW`` into the base weight (no-op when merged).

        Raises ``flora.errors.NonFiniteError`` and changes nothing when ``W + dW`` would
        hold NaN/Inf in the weight's dtype (e.g. an overflowing fp16 sum).
        """
        if self.merged:
            return
        weight = self.base_weight
        # Add in at least fp32, then round once to the weight's dtype: that rounding is
        # where an fp16/bf16 overflow shows, so the finiteness check runs after it.
        acc = torch.promote_types(weight.dtype, torch.float32)
        merged = (weight.to(acc) + self.delta_weight().to(acc)).to(weight.dtype)
        if not bool(torch.isfinite(merged).all()):
            raise NonFiniteError(
                f"merging the {self.kind} adapter would make the base weight non-finite"
            )
        self._host_weight = weight.detach().to("cpu", copy=True)
        weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bitwise from the host copy (no-op when not merged)."""
        if not self.merged:
            return
        assert self._host_weight is not None
        self.base_weight.copy_(self._host_weight)
        self._host_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"kind={self.kind}, ranks={self.ranks}, scale={self.scale}, merged={self.merged}"
