"""What the engine needs from the multi-adapter layers of `flora.serving`.

The engine drives one object that wraps the base model: a bank of `max_slots` device slots
per adapted module, a per-row routing for the next forward, and merged mode. The engine
owns the only reference and calls it from the worker thread only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from flora.adapter import Adapter


class AdapterRuntime(Protocol):
    """The `flora.serving` contract (docs/architecture.md)."""

    @property
    def merged_slot(self) -> int | None:
        """The slot whose adapter is folded into the weights, or None."""
        ...

    def load(self, slot: int, adapter: Adapter) -> None:
        """Copy the adapter's factors into `slot` on the device (core folded for linear)."""
        ...

    def unload(self, slot: int) -> None: ...

    def set_routing(self, row_slots: Sequence[int | None]) -> None:
        """The slot each row of the next forward uses (None = base only). While a slot is
        merged every row must name it (those rows then take the base path)."""
        ...

    def merge(self, slot: int) -> None:
        """Fold `slot` into the base weights (unmerging any other first)."""
        ...

    def unmerge(self) -> None:
        """Restore the base weights bitwise."""
        ...


def check_finite_update(adapter: Adapter) -> None:
    """Raise ValueError when an adapter's per-row update is not finite once its core is
    folded into the factors (what the device slots hold), e.g. a finite core of 3e38.

    `flora.load_adapter` checks that every stored value is finite, but a slot holds
    ``A = U_in``, ``B = s * C U_out^T`` (or ``A = U_in C``): that product can overflow.
    An infinite factor must never reach a slot: the batched ("wide") kernel multiplies every
    row by every slot's columns under a 0/1 mask, and ``0 * inf = NaN`` would poison the
    other rows of the batch. Finite factors whose activations overflow are caught per row
    instead (non-finite logits fail that row alone, `Stepper._sample`).
    """
    from flora.serving.factors import all_finite, fold_is_finite, modules_from_adapter
    from flora.serving.factors import fold_two_mode_many as fold_many

    # A cheap bound proves the usual adapter finite without folding (this runs on every
    # cold load, on a loader thread beside the decode loop); only an adapter the bound
    # cannot vouch for is folded, module by module, to name the culprit.
    modules = {
        name: mf
        for name, mf in modules_from_adapter(adapter).items()
        if mf.kind in ("linear", "hf_conv1d", "embedding")  # others: refused by the runtime
    }
    if fold_is_finite(list(modules.values())):
        return
    for name, ab in zip(modules, fold_many(list(modules.values())), strict=True):
        if not all_finite(ab):
            raise ValueError(
                f"{name}: the update overflows float32 (non-finite after folding the "
                "core into the factors)"
            )


def factor_dtype(adapter_dtype: str) -> torch.dtype | None:
    """The `adapter_dtype` setting as `ServingModel(factor_dtype=...)` (auto: None)."""
    import torch

    return None if adapter_dtype == "auto" else getattr(torch, adapter_dtype)


def build_serving_runtime(
    model: torch.nn.Module, max_slots: int, adapter_dtype: str = "auto"
) -> AdapterRuntime:
    """Wrap `model` with `flora.serving` for `max_slots` device slots."""
    from flora.serving.model import ServingModel

    return ServingModel(model, max_slots=max_slots, factor_dtype=factor_dtype(adapter_dtype))
