"""Interleaved timing: variants run round-robin so machine noise hits them all alike.

On a shared machine a neighbour's burst lengthens whichever sample runs during it. Running
every variant once per round, back to back, and taking the median over rounds of the
per-round ratio ``time(base) / time(variant)`` cancels slow drifts (both samples of a round
see about the same load) and ignores the rounds a burst hit hardest.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch

Sample = Callable[[], float]
"""Runs one timed sample and returns seconds per unit of work (untimed set-up inside)."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeat: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``repeat`` calls."""
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeat


def interleave(samples: Mapping[str, Sample], rounds: int) -> dict[str, list[float]]:
    """``rounds`` rounds; each runs every sample once, in a rotated order (no variant
    always runs first, after the same neighbour). Returns the per-round times."""
    names = list(samples)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            out[name].append(samples[name]())
    return out


def ratio(times: Mapping[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``times[num][i] / times[den][i]`` (a speed ratio of ``den``
    relative to ``num`` when both are seconds per unit)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def summary(times: Mapping[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median and min seconds per unit of each variant (absolute: for context only)."""
    return {
        n: {"median_s": statistics.median(t), "min_s": min(t), "samples": len(t)}
        for n, t in times.items()
    }
