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
        would force an unmerge right away).
     Until then: "batched".
   `merge_after_steps=None` disables merging altogether.

Merging costs one weight update per adapted module and unmerging restores the base bitwise
from a host copy, each about the cost of a few decode steps on a small model; the streak
requirement bounds the number of switches to one per `merge_after_steps` steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Mode = Literal["idle", "base", "merged", "batched"]


@dataclass(frozen=True)
class ModeDecision:
    mode: Mode
    merge: str | None  # the adapter that must be merged for this step (None: none merged)


def homogeneous_adapter(adapters: Sequence[str | None]) -> str | None:
    """The adapter every row uses, or None when rows differ, use the base, or are none."""
    distinct = set(adapters)
    if len(distinct) == 1:
        (only,) = distinct
        return only
    return None


def update_streak(
    previous_adapter: str | None, previous_streak: int, running: Sequence[str | None]
) -> tuple[str | None, int]:
    """Count consecutive steps whose running rows all used one adapter.
    Returns (that adapter or None, streak length)."""
    current = homogeneous_adapter(running)
    if current is None:
        return None, 0
    if current == previous_adapter:
        return current, previous_streak + 1
    return current, 1


def choose_mode(
    running: Sequence[str | None],
    waiting: Sequence[str | None],
    merged: str | None,
    streak: int,
    *,
    merge_after_steps: int | None = 4,
) -> ModeDecision:
    """Decide the mode for the next step (see the module docstring for the policy).

    running: the adapter of each row in the next step (None = base); waiting: adapters of
    requests that could be admitted next; merged: the adapter currently merged into the
    weights; streak: consecutive steps the running rows have been homogeneous on
    `homogeneous_adapter(running)` (this step included).
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
    return ModeDecision("merged", only)
