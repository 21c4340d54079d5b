"""What the engine needs from the multi-adapter layers of `flora.serving`.

The engine drives one object that wraps the base model: a bank of `max_slots` device slots
per adapted module, a per-row (or per token segment) routing for the next forward, and
merged mode. The engine
owns the only reference and calls it from the worker thread only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from flora.adapter import Adapter
    from flora.serving.segments import Segments


class AdapterRuntime(Protocol):
    """The `flora.serving` contract (docs/architecture.md)."""

    @property
    def merged_slot(self) -> int | None:
        """The slot whose adapter is folded into the weights, or None."""
        ...

    def check(self, adapter: Adapter) -> None:
        """Raise ValueError unless `load` would accept `adapter`; changes nothing. The one
        servability rule, run at upload (422) and on the cache's loader thread."""
        ...

    def load(self, slot: int, adapter: Adapter) -> None:
        """Copy the adapter's factors into `slot` on the device (core folded for linear)."""
        ...

    def unload(self, slot: int) -> None: ...

    def set_routing(self, row_slots: Sequence[int | None] | Segments) -> None:
        """The slot each row of the next forward uses (None = base only), or each token
        segment of a packed forward (`Segments`, engine v2). While a slot is merged every
        row (segment) must name it (those rows then take the base path)."""
        ...

    def merge(self, slot: int) -> None:
        """Fold `slot` into the base weights (unmerging any other first)."""
        ...

    def unmerge(self) -> None:
        """Restore the base weights bitwise."""
        ...

    def merge_cost(self, slot: int) -> tuple[int, int]:
        """Multiply-adds of merging `slot`, and of applying it to one token per row."""
        ...


def torch_factor_dtype(setting: str) -> torch.dtype | None:
    """The `factor_dtype` setting as `ServingModel(factor_dtype=...)` (auto: None)."""
    import torch

    return None if setting == "auto" else getattr(torch, setting)


def build_serving_runtime(
    model: torch.nn.Module, max_slots: int, factor_dtype: str = "auto"
) -> AdapterRuntime:
    """Wrap `model` with `flora.serving` for `max_slots` device slots."""
    from flora.serving.model import ServingModel

    return ServingModel(model, max_slots=max_slots, factor_dtype=torch_factor_dtype(factor_dtype))
