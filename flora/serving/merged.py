"""Merged mode's weights (``ServingModel.merge`` / ``unmerge``): one slot folded into the
base weights in place, and the host copies of the originals that restore them bitwise."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from flora.serving.base import ServedModule


class MergedWeights:
    """Which slot is folded into which modules' weights, and the originals on the host.

    A module's original is copied to host memory (pinned when the weight is on CUDA) the
    first time it is merged and kept there: ``restore`` copies it back, so the base is
    the same bits however many merge cycles run. The caller runs both under
    ``torch.no_grad()``.
    """

    def __init__(self) -> None:
        self.slot: int | None = None
        self.names: list[str] = []  # the modules the merged slot was folded into
        self.host: dict[str, torch.Tensor] = {}  # originals of every module ever merged

    def fold(self, slot: int, names: Iterable[str], wrappers: Mapping[str, ServedModule]) -> None:
        """Fold ``slot`` into the weights of ``names`` (nothing may be merged). A
        non-finite result raises ``ValueError`` and leaves every weight as it was."""
        assert self.slot is None, "restore the merged slot first"
        done: list[str] = []
        sums: list[torch.Tensor] = []
        # Per module: the one-time host copy of the original, then one in-place update and
        # one reduction (a finite sum proves every element finite, `all_finite`); the
        # exact per-module test runs only when some sum is not finite.
        for name in sorted(names):
            wrapper = wrappers[name]
            w = wrapper.weight
            if name not in self.host:
                self.host[name] = _host_copy(w)
            wrapper.merge_into_weight(slot)
            done.append(name)
            sums.append(w.sum(dtype=torch.float32))
        if not bool(torch.isfinite(torch.stack(sums)).all()):
            bad = [n for n in done if not bool(torch.isfinite(wrappers[n].weight).all())]
            for name in done:
                wrappers[name].weight.copy_(self.host[name])
            if bad:
                raise ValueError(f"merging slot {slot} makes {bad[0]} non-finite")
            # Every weight was finite (a sum overflowed): merge again, keep it.
            for name in done:
                wrappers[name].merge_into_weight(slot)
        self.slot = slot
        self.names = done

    def restore(self, wrappers: Mapping[str, ServedModule]) -> None:
        """Copy the originals of the merged modules back (nothing merged afterwards)."""
        for name in self.names:
            wrappers[name].weight.copy_(self.host[name])
        self.slot = None
        self.names = []


def _host_copy(w: torch.Tensor) -> torch.Tensor:
    host = torch.empty(w.shape, dtype=w.dtype, device="cpu", pin_memory=w.device.type == "cuda")
    host.copy_(w.detach())
    return host
