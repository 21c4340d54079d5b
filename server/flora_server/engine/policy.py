"""The per-step choice between merged and batched adapter application.

Policy (evaluated by the worker before every step, after new requests were admitted):

1. No running rows: mode "idle". Weights stay as they are (a merged adapter stays merged:
   the next request is likely to use it again, and unmerging costs as much as merging).
2. Every running row uses the base model: mode "base"; unmerge if an adapter is merged.
3. Running rows use more than one adapter, or mix adapters and base rows: mode "batched"
   (per-row application); unmerge first if an adapter is merged, because merged weights
   would leak into the other rows.
4. Every running row uses the same adapter X:
   - X is already merged: stay "merged" (zero per-token overhead).
   - otherwise merge X ("merged") only when both hold:
     a. the batch has been homogeneous on X for at least `merge_after_steps` consecutive
        steps (hysteresis: a stream of alternating short requests keeps running batched
        instead of merging and unmerging every few tokens);
     b. no waiting request that could join next step needs anything other than X (it
        would force an unmerge right away);
     c. the merge pays for itself (`merge_pays`): the per-row work it would save over the
        running rows' remaining token budgets is at least its own work.
     Until then: "batched".
   `merge_after_steps=None` disables merging altogether.

"Adapter" here is one loaded copy of an adapter's bytes, not its id: the engine keys rows
by the device slot they read (`Stepper`), so while an overwritten adapter's old copy still
serves its running rows and the new copy serves new rows under the same id, the two are
different adapters to this policy (merged weights of one would be wrong for the other).

Merging costs one rank-r update of every adapted weight (`out * in * r` multiply-adds per
module) and unmerging restores the base bitwise from a host copy; the per-row path costs
`(in + out) * r` per token. So one merge costs as much as about `out * in / (out + in)`
row-tokens of per-row work (348 for SmolLM2-135M with all seven projections adapted): a
batch of short requests would pay for a merge it never recovers, and with one thread per
replica a merge stalls every running row for over a second (docs/performance.md). The
streak requirement bounds the number of switches to one per `merge_after_steps` steps.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

Mode = Literal["idle", "base", "merged", "batched"]
K = TypeVar("K", bound=Hashable)  # what identifies an adapter (see above); None: the base


@dataclass(frozen=True)
class ModeDecision(Generic[K]):
    mode: Mode
    merge: K | None  # the adapter that must be merged for this step (None: none merged)


def homogeneous_adapter(adapters: Sequence[K | None]) -> K | None:
    """The adapter every row uses, or None when rows differ, use the base, or are none."""
    distinct = set(adapters)
    if len(distinct) == 1:
        (only,) = distinct
        return only
    return None


def update_streak(
    previous_adapter: K | None, previous_streak: int, running: Sequence[K | None]
) -> tuple[K | None, int]:
    """Count consecutive steps whose running rows all used one adapter.
    Returns (that adapter or None, streak length)."""
    current = homogeneous_adapter(running)
    if current is None:
        return None, 0
    if current == previous_adapter:
        return current, previous_streak + 1
    return current, 1


def merge_pays(remaining_tokens: Sequence[int], cost: tuple[int, int]) -> bool:
    """Whether merging pays for itself: `cost` is the adapter's (merge, per-token)
    multiply-adds (`AdapterRuntime.merge_cost`); merged mode saves the per-token work on
    every token the running rows may still generate (`remaining_tokens`, their budgets:
    an upper bound, a row can stop early)."""
    merge, per_token = cost
    return per_token * sum(max(0, n) for n in remaining_tokens) >= merge


def choose_mode(
    running: Sequence[K | None],
    waiting: Sequence[K | None],
    merged: K | None,
    streak: int,
    *,
    merge_after_steps: int | None = 4,
    pays: Callable[[K], bool] = lambda adapter: True,
) -> ModeDecision[K]:
    """Decide the mode for the next step (see the module docstring for the policy).

    running: the adapter of each row in the next step (None = base); waiting: adapters of
    requests that could be admitted next; merged: the adapter currently merged into the
    weights; streak: consecutive steps the running rows have been homogeneous on
    `homogeneous_adapter(running)` (this step included); pays: whether merging that
    adapter now pays for itself (rule 4c, asked last: it is the one that costs work).
    """
    if not running:
        return ModeDecision("idle", merged)
    only = homogeneous_adapter(running)
    if only is None:
        if all(a is None for a in running):
            return ModeDecision("base", None)
        return ModeDecision("batched", None)
    if merged == only:
        return ModeDecision("merged", only)
    if merge_after_steps is None or streak < merge_after_steps:
        return ModeDecision("batched", None)
    if any(a != only for a in waiting):
        return ModeDecision("batched", None)
    if not pays(only):
        return ModeDecision("batched", None)
    return ModeDecision("merged", only)
