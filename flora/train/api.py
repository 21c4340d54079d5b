"""``flora.train.train``: one training run from Python (the CLI calls this)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from flora.models.types import LoadedModel
from flora.train.device import Precision, resolve_device
from flora.train.errors import TrainError
from flora.train.options import TrainOptions
from flora.train.recipe import RecipeRegistry
from flora.train.recipes import default_recipes


def seed_everything(seed: int) -> None:
    """Seed torch and Python's ``random`` (numpy is not used for randomness here)."""
    import random

    random.seed(seed)
    torch.manual_seed(seed)


def train(
    recipe: str,
    *,
    base: str | os.PathLike[str],
    data: str,
    out: str | os.PathLike[str],
    loaded: LoadedModel | None = None,
    recipes: RecipeRegistry | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Train a FLoRA adapter and write it, ``metrics.json`` and ``loss.png`` to ``out``.

    ``options`` are the :class:`TrainOptions` fields (``rank``, ``lr``, ``max_steps``,
    ...). ``loaded`` skips loading ``base`` (tests pass tiny models). Returns the metrics.

    Raises:
        DataError: the data cannot be used (the CLI turns it into exit code 2).
        TrainError: a bad option or base model.
    """
    from flora.train.loop import check_paths, run

    registry = recipes or default_recipes()
    chosen = registry.get(recipe)
    if chosen is None:
        raise TrainError(f"unknown recipe {recipe!r}; recipes: {', '.join(registry.names())}")
    opts = TrainOptions(recipe=recipe, base=str(base), data=data, out=Path(out), **options)
    opts = opts.resolved(chosen.defaults)
    check_paths(opts)
    device = resolve_device(opts.device)
    opts.device = str(device)
    Precision(device, opts.precision)  # fails early on an unsupported combination
    threads_before = torch.get_num_threads()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    try:
        if loaded is None:
            loaded = _load_base(opts.base)
        seed_everything(opts.seed)
        # Adapters and new heads are created beside the base weights, so move the base
        # first; its weights stay float32 (bf16/fp16 apply through autocast).
        loaded.model.to(device)
        task = chosen.prepare(opts, loaded)
        return run(task, opts)
    finally:
        # The thread count is process-wide; give the caller back what it had.
        torch.set_num_threads(threads_before)


def _load_base(base: str) -> LoadedModel:
    from flora.models import ModelError, load

    try:
        return load(base)
    except ModelError as exc:
        raise TrainError(str(exc)) from None
