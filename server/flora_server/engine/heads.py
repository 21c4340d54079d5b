"""Adapter slots for classifiers: `flora.serving` layers plus each adapter's own head.

A classification adapter carries FLoRA factors for the body (conv/linear layers, served per
row by `flora.serving.ServingModel`) and, when it was trained with a new head, the head
saved whole (`train_modules = ["classifier"]`, tensors `full.classifier.weight/bias`).
Heads of different adapters may have different numbers of labels, so they cannot share one
matmul: the engine runs the body once for the whole batch (features `[B, F]`) and then each
distinct head on its own rows, `logits_k = f[rows_k] W_k^T + b_k`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from flora.serving.factors import ModuleFactors
from flora.serving.model import ServingModel
from flora.serving.segments import Segments

HEAD_NAME = "classifier"  # flora.train's head name (flora.train.heads.HEAD_NAME)


@dataclass(frozen=True)
class LinearHead:
    """`logits = x W^T + b`: weight `[C, F]`, bias `[C]` or None; `labels` has C names."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    labels: list[str]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, F] -> [N, C]
        return torch.nn.functional.linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class SlotInfo:
    """What the engine needs about the adapter in one slot besides its layers."""

    head: LinearHead | None
    task: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    has_layers: bool = True


def factors_without_heads(adapter: Any) -> dict[str, ModuleFactors]:
    """`{module: ModuleFactors}` of an adapter's FLoRA layers (its whole-saved modules are
    left out; the caller serves them)."""
    scale = float(adapter.config.scale)
    return {
        name: ModuleFactors(
            kind=str(adapter.modules[name].spec.kind),
            core=adapter.core(name),
            factors=tuple(adapter.factors(name)),
            scale=scale,
        )
        for name in adapter.layer_names()
    }


def check_head(adapter: Any, in_features: int) -> dict[str, torch.Tensor] | None:
    """The adapter's `classifier` state (`{"weight": [C, F], "bias": [C]}`) after checking it
    fits a body producing `in_features` features, or None when the adapter has no head.

    Raises ValueError for whole-saved modules other than the head (they would change the
    body for every row), for a head that is not a Linear, whose input width is not
    `in_features`, whose number of outputs disagrees with its bias or label names, or
    whose label names repeat.
    Runs at upload (the server's validator) and again when a slot is loaded.
    """
    full = adapter.full_modules()
    others = [m for m in full if m != HEAD_NAME]
    if others:
        raise ValueError(
            f"the adapter retrains whole modules {others}; only a {HEAD_NAME!r} head can be "
            "served next to other adapters"
        )
    if HEAD_NAME not in full:
        return None
    state = adapter.full_state(HEAD_NAME)
    weight = state.get("weight")
    if weight is None or weight.dim() != 2 or set(state) - {"weight", "bias"}:
        raise ValueError(f"the {HEAD_NAME!r} head must be a Linear (weight [C, F], bias [C])")
    if weight.shape[1] != in_features:
        raise ValueError(
            f"the {HEAD_NAME!r} head takes {weight.shape[1]} features, the base produces "
            f"{in_features}"
        )
    num = int(weight.shape[0])
    bias = state.get("bias")
    if bias is not None and tuple(bias.shape) != (num,):
        raise ValueError(
            f"the {HEAD_NAME!r} head has {num} outputs but its bias has shape {list(bias.shape)}"
        )
    if adapter.labels and len(adapter.labels) != num:
        raise ValueError(
            f"the head has {num} outputs but the adapter names {len(adapter.labels)} labels"
        )
    # Two classes of one name: a prediction could not say which.
    repeated = [label for label, n in Counter(adapter.labels or ()).items() if n > 1]
    if repeated:
        raise ValueError(f"labels: {repeated[0]!r} names two of the head's classes")
    return state


def read_head(
    adapter: Any, in_features: int, device: torch.device, dtype: torch.dtype
) -> LinearHead | None:
    """The adapter's own `classifier` head on `device`, or None when it has none (checked
    by `check_head`, whose ValueError it raises)."""
    state = check_head(adapter, in_features)
    if state is None:
        return None
    weight, bias = state["weight"], state.get("bias")
    num = int(weight.shape[0])
    labels = list(adapter.labels) if adapter.labels else [f"LABEL_{i}" for i in range(num)]
    return LinearHead(
        weight.to(device=device, dtype=dtype, copy=True),
        None if bias is None else bias.to(device=device, dtype=dtype, copy=True),
        labels,
    )


class HeadedRuntime:
    """The `AdapterRuntime` the engine's cache drives: body layers in a `ServingModel`,
    heads and per-adapter metadata beside it, per slot."""

    def __init__(self, serving: ServingModel, in_features: int) -> None:
        self.serving = serving
        self.in_features = in_features
        self.slots: list[SlotInfo | None] = [None] * serving.max_slots

    @property
    def merged_slot(self) -> int | None:
        return self.serving.merged_slot

    def check(self, adapter: Any) -> None:
        """Raise ValueError unless `load` would accept `adapter`: its head, then its body
        layers (the serving model's rule), whose outputs must also stay finite
        (`ServingModel.check_output_range`: these engines return the values themselves, an
        overflow would be served as null embeddings and scores)."""
        check_head(adapter, self.in_features)
        self.serving.check_modules(factors_without_heads(adapter), output_range=True)

    def load(self, slot: int, adapter: Any) -> None:
        head = read_head(adapter, self.in_features, self.serving.device, self.serving.dtype)
        modules = factors_without_heads(adapter)
        if modules:
            self.serving.load_modules(slot, modules)
        else:
            self.serving.unload(slot)
        self.slots[slot] = SlotInfo(head, adapter.task, dict(adapter.metadata), bool(modules))

    def unload(self, slot: int) -> None:
        self.serving.unload(slot)
        self.slots[slot] = None

    def set_routing(self, row_slots: Sequence[int | None] | Segments) -> None:
        """Route rows (or token segments) of head-only adapters to the base body."""
        slots = row_slots.slots if isinstance(row_slots, Segments) else row_slots
        body = [s if s is not None and s >= 0 and self._info(s).has_layers else -1 for s in slots]
        self.serving.set_routing(
            row_slots.with_slots(body) if isinstance(row_slots, Segments) else body
        )

    def merge(self, slot: int) -> None:
        self.serving.merge(slot)

    def unmerge(self) -> None:
        self.serving.unmerge()

    def merge_cost(self, slot: int) -> tuple[int, int]:
        return self.serving.merge_cost(slot)

    def info(self, slot: int | None) -> SlotInfo | None:
        return None if slot is None else self._info(slot)

    def _info(self, slot: int) -> SlotInfo:
        info = self.slots[slot]
        if info is None:
            raise ValueError(f"slot {slot} is empty")
        return info


def apply_heads(
    features: torch.Tensor,
    row_slots: Sequence[int | None],
    heads: dict[int | None, LinearHead],
) -> list[torch.Tensor]:
    """Per row, the logits of its slot's head (`None`: the base head).

    features: [B, F]. Rows are grouped by head so each head runs once; returns B tensors
    (their widths differ between heads).
    """
    out: list[torch.Tensor | None] = [None] * len(row_slots)
    for key in dict.fromkeys(row_slots):
        rows = [i for i, s in enumerate(row_slots) if s == key]
        index = torch.tensor(rows, device=features.device)
        logits = heads[key](features.index_select(0, index))
        for j, i in enumerate(rows):
            out[i] = logits[j]
    return out  # type: ignore[return-value]
