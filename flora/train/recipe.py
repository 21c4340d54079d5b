"""Recipes: what a task needs from the shared loop, and the registry that names them.

A recipe turns ``TrainOptions`` into a :class:`TrainTask`: an injected model (adapters,
plus any new head in ``train_modules``), train and eval examples, and four callables the
loop uses (collate, loss, evaluate, train mode). The registry is filled by explicit
``register`` calls in :func:`flora.train.recipes.default_recipes` (the composition root,
kept apart so that this contract module imports no recipe); nothing is registered at
import time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from flora.models.types import LoadedModel
from flora.train.options import RecipeDefaults, TrainOptions

Batch = dict[str, torch.Tensor]


@dataclass
class TrainTask:
    """A prepared training task.

    Attributes:
        model: the base with FLoRA injected (cores at zero, so before the first step it
            computes the base model, plus the untrained head if the recipe adds one).
        task: the adapter's task string (``causal-lm``, ``text-classification``, ...).
        labels: class names for classification (index = class id), else None.
        collate: examples -> a batch of tensors.
        loss: (model, batch) -> scalar loss.
        evaluate: (model, examples) -> metrics such as ``{"eval_accuracy": 0.97}``.
        train_mode: puts the model in training mode (e.g. with frozen batch-norm stats).
        metadata: JSON-able facts saved in the adapter (image size, pooling, ...).
        extra_metrics: optional; more metrics computed once on the same eval examples
            (e.g. a linear probe).
        lr_scale: optional learning-rate multipliers by module name.
        eval_key: optional; the class of an eval example, so eval subsets are stratified.
        best_metric: the metric ``--eval-every`` keeps the best adapter by, and whether
            greater is better.
    """

    model: nn.Module
    base_model_id: str
    task: str
    labels: list[str] | None
    train_examples: Sequence[Any]
    eval_examples: Sequence[Any]
    collate: Callable[[list[Any]], Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    evaluate: Callable[[nn.Module, Sequence[Any]], dict[str, float]]
    train_mode: Callable[[nn.Module], object]
    metadata: dict[str, Any] = field(default_factory=dict)
    extra_metrics: Callable[[Sequence[Any]], dict[str, float]] | None = None
    lr_scale: dict[str, float] = field(default_factory=dict)
    """Learning-rate multipliers by module name (a parameter under ``name.`` gets
    ``lr * scale``), e.g. a head on L2-normalised features needs a larger step."""
    eval_key: Callable[[Any], str] | None = None
    best_metric: tuple[str, bool] = ("eval_accuracy", True)


class Recipe(Protocol):
    """A training recipe: its name, defaults, and how it prepares a task."""

    name: str
    description: str
    defaults: RecipeDefaults

    def prepare(self, options: TrainOptions, loaded: LoadedModel) -> TrainTask:
        """Load data, add the head, inject adapters; ``options`` are already resolved."""
        ...


class RecipeRegistry:
    """Recipes by name."""

    def __init__(self) -> None:
        self._recipes: dict[str, Recipe] = {}

    def register(self, recipe: Recipe) -> None:
        """Add ``recipe``; a name may be registered once."""
        if recipe.name in self._recipes:
            raise ValueError(f"recipe {recipe.name!r} is already registered")
        self._recipes[recipe.name] = recipe

    def get(self, name: str) -> Recipe | None:
        """The recipe called ``name``, or None."""
        return self._recipes.get(name)

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._recipes)

    def __iter__(self) -> Iterator[Recipe]:
        return iter(self._recipes.values())
