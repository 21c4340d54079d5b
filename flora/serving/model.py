"""ServingModel: one base model, many FLoRA adapters in device slots, per-row or merged.

How the engine uses the two modes (decided per step, cheap to switch):

- Batched (per row): ``set_routing([slot or None per row])`` before the forward calls of a
  batch composition; rows of different adapters (and base rows) share every matmul.
- Merged: when every running row uses the same adapter ``k``, ``merge(k)`` folds it into
  the base weights (the forward then costs exactly the base) and ``set_routing`` must
  route every row to ``k`` (the merged adapter is never applied twice: rows on the merged
  slot take the base path). When the mix changes, ``unmerge()`` (exact: the base weights
  are copied back from a host copy) and route per row again.

Everything that depends only on the routing (row groups, gathered factors, masks, which
modules are active) is built once in ``set_routing`` and cached for the last few
compositions, so decode steps with an unchanged batch pay nothing for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeGuard

import torch
from torch import nn

from flora.kinds import is_conv, is_linear, is_plain_embedding
from flora.serving.backends import Backend, select
from flora.serving.base import NO_SLOT, Plan, RoutingState, ServedModule, ServingPolicy
from flora.serving.conv import ServedConv
from flora.serving.embedding import ServedEmbedding
from flora.serving.factors import (
    ModuleFactors,
    all_finite,
    fold_is_finite,
    fold_two_mode_many,
    modules_from_adapter,
)
from flora.serving.gain import FLOAT32_GAIN_LIMIT, update_gain, update_gain_bound
from flora.serving.linear import ServedLinear
from flora.serving.merged import MergedWeights
from flora.serving.segments import Segments
from flora.serving.two_mode import ServedTwoMode

__all__ = ["ServingModel", "register_wrapper"]

# First match wins; extend with register_wrapper instead of an isinstance ladder.
_WRAPPERS: list[tuple[Callable[[nn.Module], bool], type[ServedModule]]] = [
    (is_linear, ServedLinear),
    (is_plain_embedding, ServedEmbedding),
    (is_conv, ServedConv),
]


def register_wrapper(matches: Callable[[nn.Module], bool], cls: type[ServedModule]) -> None:
    """Add a served wrapper for another module type (tried before the built-in ones)."""
    _WRAPPERS.insert(0, (matches, cls))


@contextlib.contextmanager
def _one_intra_op_thread(device: torch.device) -> Iterator[None]:
    """Run a burst of small CPU ops on the calling thread alone.

    Loading a slot is a few thousand ops on tensors of a few thousand elements (the folds
    are ``(r, r) @ (r, n)`` matmuls). On a CPU each BLAS call may hand its work to the
    intra-op pool and wait for it; on a busy machine that wait is a scheduler time slice,
    orders of magnitude longer than the call's own work (docs/performance.md, "Cold
    load"); the same holds for the memory-bound weight updates of a merge. The setting is restored
    afterwards; the engine calls these from its worker thread, the same thread that runs
    the forward passes, so no decode step overlaps the window.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _overflow(name: str) -> ValueError:
    return ValueError(
        f"{name}: the update overflows float32 (non-finite after folding the core into the factors)"
    )


def _folds(wrapper: ServedModule) -> TypeGuard[ServedTwoMode]:
    """Two-mode wrappers (Linear, Conv1D, Embedding) hold the core folded into a factor."""
    return isinstance(wrapper, ServedTwoMode)


def _slots_of(routing: tuple[int, ...] | Segments) -> tuple[int, ...]:
    """The slots a routing names (per row, or per segment)."""
    return routing.slots if isinstance(routing, Segments) else routing


def _bank_ptrs(wrapper: ServedModule) -> tuple[int, int] | None:
    """Where a two-mode wrapper's factor bank lives (changes when the bank grows)."""
    bank = getattr(wrapper, "bank", None)
    return None if bank is None else (bank.a.data_ptr(), bank.b.data_ptr())


def _wrapper_for(module: nn.Module) -> type[ServedModule]:
    for matches, cls in _WRAPPERS:
        if matches(module):
            return cls
    raise ValueError(f"no served wrapper for {type(module).__name__}")


class ServingModel:
    """Wraps ``model`` for multi-adapter inference with ``max_slots`` device slots.

    Modules are wrapped lazily, when a loaded adapter first targets them; a wrapped module
    that no row of the current batch needs costs a list lookup. Call the model as before
    (``serving.model(...)`` or ``serving(...)``), after ``set_routing``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_slots: int,
        max_rank: int = 64,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        policy: ServingPolicy | None = None,
        routing_cache_size: int = 4,
        factor_dtype: torch.dtype | None = None,
    ) -> None:
        if max_slots < 1:
            raise ValueError("max_slots must be >= 1")
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self.dtype = dtype or param.dtype
        if param.device != self.device or param.dtype != self.dtype:
            model.to(device=self.device, dtype=self.dtype)
        self.model = model
        self.max_slots = max_slots
        self.max_rank = max_rank
        self.policy = policy or ServingPolicy(wide_max_rank=0 if self.device.type == "cuda" else 32)
        if factor_dtype is not None:  # shorthand for the policy field
            self.policy = dataclasses.replace(self.policy, factor_dtype=factor_dtype)
        if any(is_linear(m) for m in model.modules()):
            # Load the kernel backend now, not at the first adapter load: on the CPU numba's
            # kernel is compiled or read from its disk cache (seconds, and numba and LLVM
            # stay resident: a fixed cost of the process); on CUDA, Triton's kernel is
            # compiled and self-tested. A model with no linear layer (a conv body) never
            # needs one.
            select(self.policy, self.device, self.dtype)
        self.routing = RoutingState()
        self._wrapped: dict[str, ServedModule] = {}
        self._slot_modules: list[frozenset[str] | None] = [None] * max_slots
        # merge_cost of each slot, computed when it is loaded (read only while it is)
        self._merge_costs: list[tuple[int, int]] = [(0, 0)] * max_slots
        self._merged = MergedWeights()
        self._plan_cache: OrderedDict[tuple[int, ...] | Segments, list[Plan | None]] = OrderedDict()
        self._cache_size = routing_cache_size
        self._layout_version = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    # -- slots ----------------------------------------------------------------------------
    @property
    def merged_slot(self) -> int | None:
        """The slot folded into the base weights, or ``None``."""
        return self._merged.slot

    @property
    def layout_version(self) -> int:
        """Changes whenever a tensor that a graph plan reads is re-bound: a module newly
        wrapped (or unwrapped), a slot bank grown to a larger rank capacity. Loading,
        clearing, merging and unmerging write into the existing tensors and leave it."""
        return self._layout_version

    def slot_modules(self, slot: int) -> frozenset[str] | None:
        """Names of the modules ``slot`` targets, ``None`` when the slot is empty."""
        return self._slot_modules[self._check_slot(slot)]

    def wrapped_modules(self) -> list[str]:
        return list(self._wrapped)

    def merge_cost(self, slot: int) -> tuple[int, int]:
        """Multiply-adds of merging ``slot`` (every targeted weight gains a rank-r product:
        ``out * in * r``) and of applying it to one token on the per-row path (shrink and
        expand: ``(in + out) * r``), summed over its modules. Their ratio is how many
        row-tokens of per-row work one merge costs, whatever the rank (the engine's
        merge policy reads it every step, so it is counted once, at load)."""
        if self._slot_modules[self._check_slot(slot)] is None:
            raise ValueError(f"slot {slot} is not loaded")
        return self._merge_costs[slot]

    def _count_merge_cost(self, slot: int, names: Iterable[str]) -> tuple[int, int]:
        merge = per_token = 0
        for name in names:
            wrapper = self._wrapped[name]
            rank = wrapper.slot_rank[slot]
            shape = wrapper.weight.shape
            merge += wrapper.weight.numel() * rank
            per_token += (shape[0] + shape[1]) * rank
        return merge, per_token

    def check(self, adapter: Any, *, output_range: bool = False) -> None:
        """Raise ValueError unless ``load`` would accept ``adapter``; changes nothing.
        ``output_range``: also refuse an update whose outputs would overflow
        (:meth:`check_output_range`).

        The one owner of "can this adapter be served per row": no modules saved whole,
        every target is a module of this base that a served wrapper takes, with shapes and
        ranks that fit, and the update stays finite once its core is folded into the slot
        factors. Servers call it at upload, so a misfit is refused there, not at first use.
        """
        self.check_modules(modules_from_adapter(adapter), output_range=output_range)

    def check_modules(
        self, modules: Mapping[str, ModuleFactors], *, output_range: bool = False
    ) -> None:
        """``check`` for raw per-module tensors (what ``load_modules`` takes); with
        ``output_range``, also :meth:`check_output_range` (what an upload must pass)."""
        self._check_fit(modules)
        foldable = [mf for name, mf in modules.items() if _folds(self._target(name))]
        # A cheap bound vouches for the usual adapter; otherwise fold and name the module.
        if not fold_is_finite(foldable):
            for name, mf in modules.items():
                if _folds(self._target(name)) and not all_finite(fold_two_mode_many([mf])[0]):
                    raise _overflow(name)
        if output_range:
            self.check_output_range(modules)

    def gain_limit(self) -> float:
        """The largest :func:`update_gain` :meth:`check_output_range` lets through: the
        float32 limit (``gain.FLOAT32_GAIN_LIMIT``, about 4.3e9), and no more than what the
        serving dtype can hold (float16: 65504)."""
        return min(FLOAT32_GAIN_LIMIT, float(torch.finfo(self.dtype).max))

    def check_output_range(self, modules: Mapping[str, ModuleFactors]) -> None:
        """Raise ValueError naming the first module whose update's outputs would overflow:
        its gain (:func:`update_gain`: the largest output for inputs of magnitude 1) above
        :meth:`gain_limit`. Such an update is finite as stored and once folded (``check``
        passes it) but turns the activations after it into Inf and then NaN, so every
        embedding or score it produces is null. Engines that return those values (the
        encoder and vision engines) run this at upload and at load; the cheap bound
        (:func:`update_gain_bound`) vouches for the usual adapter, the exact gain is
        computed only for a module whose bound exceeds the limit."""
        limit = self.gain_limit()
        for name in sorted(modules):
            mf = modules[name]
            if update_gain_bound(mf) < limit:
                continue
            gain = update_gain(mf)
            if not gain < limit:  # NaN and Inf too
                raise ValueError(
                    f"{name}: the update multiplies inputs of size 1 into outputs of {gain:.3g} "
                    f"(config.scale {mf.scale:g}), past the {limit:.3g} the served model's "
                    f"{str(self.dtype).removeprefix('torch.')} activations can carry through "
                    "its normalisations: its outputs would be Inf/NaN"
                )

    def _check_fit(self, modules: Mapping[str, ModuleFactors]) -> None:
        """Every module a target a served wrapper takes, with shapes and ranks that fit."""
        if not modules:
            raise ValueError("an adapter must target at least one module")
        for name, mf in modules.items():
            self._target(name).check(name, mf)

    def load(self, slot: int, adapter: Any) -> None:
        """Copy ``adapter`` (a ``flora.Adapter``) into ``slot``, replacing what was there."""
        self.load_modules(slot, modules_from_adapter(adapter))

    def load_modules(self, slot: int, modules: Mapping[str, ModuleFactors]) -> None:
        """Copy raw per-module tensors into ``slot``. Everything is checked first, so a bad
        adapter changes nothing: the fit here, finiteness on the folded factors below
        (exact, where ``check`` first tries a bound that spares the folds)."""
        self._check_slot(slot)
        self._check_fit(modules)
        wrapped_before = len(self._wrapped)
        banks_before = {n: _bank_ptrs(self._wrapped[n]) for n in modules if n in self._wrapped}
        foldable = [name for name in modules if _folds(self._target(name))]
        with torch.no_grad(), _one_intra_op_thread(self.device):
            # One batched fold for all two-mode modules (a few bmm, not one matmul each).
            # What is written must be finite: merging would write it into the base weight,
            # and the torch "wide" fallback's row mask turns it into NaN on the other rows
            # (0 * inf).
            folded = dict(
                zip(foldable, fold_two_mode_many([modules[n] for n in foldable]), strict=True)
            )
            if not all_finite(t for ab in folded.values() for t in ab):
                raise _overflow(next(n for n, ab in folded.items() if not all_finite(ab)))
            previous = self._slot_modules[slot]
            if previous is not None:
                if self._merged.slot == slot:
                    self.unmerge()
                # A folded write overwrites the module's whole slot (padding included):
                # clear only what the new adapter does not rewrite that way.
                for name in previous:
                    if name not in folded:
                        self._wrapped[name].clear_slot(slot)
                self._slot_modules[slot] = None
            for name, mf in modules.items():
                wrapper = self._wrap(name)
                if name in folded and _folds(wrapper):
                    wrapper.write_folded(slot, *folded[name])
                else:
                    wrapper.write_slot(slot, mf)
        self._slot_modules[slot] = frozenset(modules)
        self._merge_costs[slot] = self._count_merge_cost(slot, modules)
        if len(self._wrapped) != wrapped_before or any(
            _bank_ptrs(self._wrapped[n]) != ptrs for n, ptrs in banks_before.items()
        ):
            self._layout_version += 1
        self._refresh(slot if len(self._wrapped) == wrapped_before else None)

    def unload(self, slot: int) -> None:
        """Clear ``slot`` (unmerging first if it is the merged one). A routing that used it
        is dropped: call ``set_routing`` again."""
        names = self._slot_modules[self._check_slot(slot)]
        if names is None:
            return
        if self._merged.slot == slot:
            self.unmerge()
        for name in names:
            self._wrapped[name].clear_slot(slot)
        self._slot_modules[slot] = None
        self._refresh(slot)

    # -- routing --------------------------------------------------------------------------
    def set_routing(self, routing: Sequence[int | None] | Segments) -> None:
        """Which slot each row of the next forward calls uses (``None``/-1: base only), or,
        for a packed forward, each token segment (``Segments``, SGMV).

        Per row: inputs must then have ``len(routing)`` rows: ``[B, T, D]`` (prefill,
        padded) or ``[B, 1, D]`` (decode); ids ``[B, T]``; images ``[B, C, H, W]``.
        Segments: inputs hold ``routing.total`` tokens in any leading shape (``[1, T, D]``
        for a packed step), the segments tiling them in order; Linear, Conv1D and
        Embedding modules apply each segment's adapter to its tokens at once; conv
        modules refuse segments.
        """
        if isinstance(routing, Segments):
            slots = routing.slots
        else:
            slots = tuple(NO_SLOT if s is None else int(s) for s in routing)
        for s in slots:
            if s != NO_SLOT and (not 0 <= s < self.max_slots or self._slot_modules[s] is None):
                raise ValueError(f"slot {s} is not loaded")
        if self._merged.slot is not None:
            if any(s != self._merged.slot for s in slots):
                raise ValueError(
                    f"slot {self._merged.slot} is merged: every row must use it (unmerge first)"
                )
            # The merged weights already carry the adapter: run every row as base.
            slots = (NO_SLOT,) * len(slots)
        key: tuple[int, ...] | Segments = slots
        if isinstance(routing, Segments):
            key = routing.with_slots(slots)
        plans = self._plan_cache.get(key)
        if plans is None:
            with torch.no_grad(), _one_intra_op_thread(self.device):
                if isinstance(key, Segments):
                    plans = [m.build_segment_plan(key) for m in self._wrapped.values()]
                else:
                    plans = [m.build_plan(key) for m in self._wrapped.values()]
                self._share(plans)
            self._plan_cache[key] = plans
            while len(self._plan_cache) > self._cache_size:
                self._plan_cache.popitem(last=False)
        else:
            self._plan_cache.move_to_end(key)
        self.routing.plans = plans
        if isinstance(routing, Segments):
            self.routing.rows, self.routing.tokens = None, routing.total
            self.routing.routed = routing
        else:
            self.routing.rows, self.routing.tokens = len(slots), None
            self.routing.routed = tuple(NO_SLOT if s is None else int(s) for s in routing)

    def set_graph_routing(self, slots: torch.Tensor) -> None:
        """Route ``len(slots)`` rows by the slot ids in ``slots`` (``[B]`` int32 on the
        device, -1: base), read when the forward runs rather than now, so a CUDA graph
        captured after this call serves any routing of ``B`` rows: the caller fills
        ``slots`` in place before each replay, with loaded, unmerged slots only (nothing
        here can check values it has not seen). Such a graph stays valid until
        ``layout_version`` changes. Raises ``ValueError`` while a slot is merged (every row
        then runs the base path: route with ``set_routing``) and ``NotImplementedError``
        when a wrapped module has no graph plan (see ``ServedModule.build_graph_plan``)."""
        if self._merged.slot is not None:
            raise ValueError(f"slot {self._merged.slot} is merged: graph routing needs none")
        if slots.dtype != torch.int32 or slots.dim() != 1 or slots.device != self.device:
            raise ValueError(f"slots must be [B] int32 on {self.device}")
        plans = [m.build_graph_plan(slots) for m in self._wrapped.values()]
        self._share(plans)
        self.routing.plans = plans
        self.routing.rows, self.routing.tokens = int(slots.shape[0]), None
        self.routing.routed = None  # nothing to rebuild on a load: the plans read slots

    def clear_routing(self) -> None:
        """Every row base only (no adapter path anywhere)."""
        self.routing.plans = [None] * len(self._wrapped)
        self.routing.rows = None
        self.routing.tokens = None
        self.routing.routed = None

    # -- merged mode ----------------------------------------------------------------------
    def merge(self, slot: int) -> None:
        """Fold ``slot`` into the base weights of the modules it targets.

        The original weights are copied to host memory (pinned when the device is CUDA)
        the first time a module is merged and kept there; ``unmerge`` copies them back, so
        the base is restored bitwise however many cycles run. A non-finite result raises
        ``ValueError`` and leaves every weight as it was.
        """
        names = self._slot_modules[self._check_slot(slot)]
        if names is None:
            raise ValueError(f"slot {slot} is not loaded")
        if self._merged.slot == slot:
            return
        if self._merged.slot is not None:
            self.unmerge()
        # One thread: one memory-bound update per module; on a busy CPU each parallel
        # region waits for a time slice (docs/performance.md, "Cold load").
        with torch.no_grad(), _one_intra_op_thread(self.device):
            self._merged.fold(slot, names, self._wrapped)
        for wrapper in self._wrapped.values():
            wrapper.invalidate()
        self._refresh()

    def unmerge(self) -> None:
        """Restore the base weights bitwise (no-op when nothing is merged)."""
        if self._merged.slot is None:
            return
        with torch.no_grad(), _one_intra_op_thread(self.device):
            self._merged.restore(self._wrapped)
        for wrapper in self._wrapped.values():
            wrapper.invalidate()
        self._refresh()

    def unwrap(self) -> nn.Module:
        """Unmerge, put every original module back and return the bare base model."""
        self.unmerge()
        for name, wrapper in self._wrapped.items():
            parent, _, child = name.rpartition(".")
            setattr(
                self.model.get_submodule(parent) if parent else self.model,
                child,
                wrapper.base_layer,
            )
        self._wrapped.clear()
        self._layout_version += 1
        self._slot_modules = [None] * self.max_slots
        self._plan_cache.clear()
        self.clear_routing()
        return self.model

    # -- internals ------------------------------------------------------------------------
    def _check_slot(self, slot: int) -> int:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.max_slots})")
        return slot

    def _target(self, name: str) -> ServedModule:
        """The wrapper of ``name`` if wrapped, else a throwaway one to check against."""
        if name in self._wrapped:
            return self._wrapped[name]
        try:
            module = self.model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"the base model has no module {name!r}") from exc
        if isinstance(module, ServedModule):
            raise ValueError(f"{name!r} is already wrapped by another ServingModel")
        cls = _wrapper_for(module)
        return cls(module, RoutingState(), 0, self.max_slots, self.max_rank, self.policy)

    def _wrap(self, name: str) -> ServedModule:
        wrapper = self._wrapped.get(name)
        if wrapper is not None:
            return wrapper
        module = self.model.get_submodule(name)
        cls = _wrapper_for(module)
        wrapper = cls(
            module, self.routing, len(self._wrapped), self.max_slots, self.max_rank, self.policy
        )
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, wrapper)
        self._wrapped[name] = wrapper
        self.routing.plans = [*self.routing.plans, None]
        return wrapper

    def _share(self, plans: list[Plan | None]) -> None:
        """Let each group of siblings' backend share their work (``Backend.share``)."""
        for backend, group in self._shared_groups():
            for i, plan in zip(group, backend.share([plans[i] for i in group]), strict=True):
                plans[i] = plan

    def _shared_groups(self) -> list[tuple[Backend, list[int]]]:
        """Indices (into the plan list) of wrapped Linear siblings named in
        ``policy.shared_inputs`` (same parent, two or more wrapped), each group with the
        backend of its first member (the one that shares their work)."""
        by_key: dict[tuple[str, int], list[int]] = {}
        backends: dict[tuple[str, int], Backend] = {}
        for i, (name, wrapper) in enumerate(self._wrapped.items()):
            if not isinstance(wrapper, ServedLinear) or wrapper.kind != "linear":
                continue
            parent, _, child = name.rpartition(".")
            for g, names in enumerate(self.policy.shared_inputs):
                if child in names:
                    by_key.setdefault((parent, g), []).append(i)
                    backends.setdefault((parent, g), wrapper.backend)
        return [(backends[key], ix) for key, ix in by_key.items() if len(ix) > 1]

    def _refresh(self, slot: int | None = None) -> None:
        """Slots, merges or the wrapped set changed: drop cached plans, rebuild the current
        routing (or drop it if it names a slot that is gone).

        ``slot``: only that slot's contents changed (load/unload, no newly wrapped module):
        plans of routings that do not use it stay valid (they hold copies of their own
        slots' factors), so only routings naming it are dropped and rebuilt. A cold load
        then does not rebuild the running batch's plans for every wrapped module.
        """
        current = self.routing.routed
        used = _slots_of(current) if current is not None else ()
        if slot is not None and self._merged.slot is None:
            for key in [k for k in self._plan_cache if slot in _slots_of(k)]:
                del self._plan_cache[key]
            if current is None or slot not in used:
                return
        else:
            self._plan_cache.clear()
        if (
            current is not None
            and all(s == NO_SLOT or self._slot_modules[s] is not None for s in used)
            and (self._merged.slot is None or all(s == self._merged.slot for s in used))
        ):
            self.set_routing(current)
        else:
            self.clear_routing()

    def named_wrappers(self) -> Iterable[tuple[str, ServedModule]]:
        return self._wrapped.items()
