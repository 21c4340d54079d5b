"""What the two-mode served modules (Linear, transformers Conv1D, Embedding) share: a slot
bank of folded factors ``A (d_in, r)``, ``B (r, d_out)`` per slot, written, cleared and checked
the same way; only their forward passes differ."""

from __future__ import annotations

import torch

from flora.serving.bank import DeviceSlotBank
from flora.serving.base import ServedModule
from flora.serving.factors import ModuleFactors, check_weight_shape, fold_two_mode


class ServedTwoMode(ServedModule):
    """Base for served modules whose update folds into two factors (``self.bank``)."""

    bank: DeviceSlotBank

    def check(self, name: str, mf: ModuleFactors) -> None:
        if mf.kind != self.kind:
            raise ValueError(f"{name}: adapter kind {mf.kind!r}, base module is {self.kind}")
        check_weight_shape(name, mf, self.weight.shape)
        if min(mf.ranks) > self.max_rank:
            raise ValueError(f"{name}: rank {min(mf.ranks)} exceeds max_rank {self.max_rank}")

    def write_slot(self, slot: int, mf: ModuleFactors) -> None:
        self.write_folded(slot, *fold_two_mode(mf))

    def write_folded(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Copy an already folded update (``fold_two_mode``'s ``A``, ``B``) into ``slot``."""
        self.bank.write(slot, a.to(self.bank.dtype), b.to(self.bank.dtype))
        self.slot_rank[slot] = a.shape[1]

    def clear_slot(self, slot: int) -> None:
        self.bank.clear(slot)
        self.slot_rank[slot] = 0

    def slot_product(self, slot: int) -> torch.Tensor:
        """``A @ B`` of ``slot`` in float32, shape ``(d_in, d_out)``."""
        r = self.slot_rank[slot]
        return self.bank.a[slot, :, :r].float() @ self.bank.b[slot, :r].float()
