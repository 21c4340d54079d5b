"""Eval batching shared by the recipes: fixed-size chunks behind a progress bar, moved to
the run's device."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from tqdm import tqdm

from flora.train.device import to_device


def eval_chunks(
    examples: Sequence[Any], size: int, progress: bool, desc: str = "eval"
) -> Iterator[list[Any]]:
    """``examples`` in lists of at most ``size``, with a tqdm bar (counting examples) on
    stderr when ``progress``; the bar disappears when done."""
    with tqdm(
        total=len(examples),
        desc=desc,
        unit="ex",
        file=sys.stderr,
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    ) as bar:
        for start in range(0, len(examples), size):
            chunk = list(examples[start : start + size])
            yield chunk
            bar.update(len(chunk))


def on_device(
    collate: Callable[[list[Any]], dict[str, torch.Tensor]], device: torch.device
) -> Callable[[list[Any]], dict[str, torch.Tensor]]:
    """``collate`` whose batches land on ``device``."""

    def collate_on_device(examples: list[Any]) -> dict[str, torch.Tensor]:
        return to_device(collate(examples), device)

    return collate_on_device
