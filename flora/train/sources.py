"""Resolve ``--data`` / ``--eval-split`` into train and eval examples for a recipe."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flora.train import builtin
from flora.train.data import (
    Splits,
    encode_labels,
    load_chats,
    parse_eval_split,
    refuse_columns,
    stratified_split,
)
from flora.train.errors import DataError
from flora.train.options import TrainOptions

DEFAULT_EVAL_FRACTION = 0.1


@dataclass
class LabelledData:
    """Encoded examples ``(x, class_id)`` and the class names (index = id)."""

    train: list[tuple[Any, int]]
    eval: list[tuple[Any, int]]
    labels: list[str]
    hints: dict[str, Any] = field(default_factory=dict)


Loader = Callable[..., list[Any] | None]
"""``(spec, columns, split="train"|"eval") -> examples`` (None: the source has no eval
split of its own)."""


def _raw(
    options: TrainOptions, kind: builtin.DataKind, load_file: Loader
) -> tuple[Splits, dict[str, Any]]:
    eval_split = parse_eval_split(options.eval_split)
    if builtin.is_builtin(options.data):
        refuse_columns(options.columns, f"{options.data} is a builtin data set")
        dataset = builtin.resolve(options.data)
        if dataset.kind != kind:
            raise DataError(
                f"{options.data} is {dataset.kind} data; {options.recipe} needs {kind} data"
            )
        splits, hints = dataset.load(options.seed), dict(dataset.hints or {})
    else:
        train = load_file(options.data, options.columns)
        assert train is not None
        own_eval = load_file(options.data, options.columns, "eval")
        splits, hints = Splits(train=train, eval=own_eval), {}
    if isinstance(eval_split, str):
        splits.eval = load_file(eval_split, options.columns)
    elif eval_split is not None or splits.eval is None:
        fraction = DEFAULT_EVAL_FRACTION if eval_split is None else eval_split
        key = (lambda item: item[1]) if kind != "chat" else (lambda item: "")
        splits.train, splits.eval = stratified_split(splits.train, key, fraction, options.seed)
    return splits, hints


def labelled_data(options: TrainOptions, kind: builtin.DataKind, load_file: Loader) -> LabelledData:
    """Train/eval ``(x, class_id)`` for a classification recipe (builtin or files)."""
    splits, hints = _raw(options, kind, load_file)
    assert splits.eval is not None
    train, eval_, labels = encode_labels(
        splits.train, splits.eval, options.data, _eval_where(options)
    )
    return LabelledData(train, eval_, labels, hints)


def chat_data(options: TrainOptions) -> tuple[list[Any], list[Any]]:
    """Train/eval conversations for the causal-lm recipe."""
    splits, _ = _raw(options, "chat", load_chats)
    assert splits.eval is not None
    if not splits.train:
        raise DataError(f"{options.data}: the training set is empty")
    if not splits.eval:
        raise DataError(f"{_eval_where(options)}: the eval set is empty")
    return splits.train, splits.eval


def _eval_where(options: TrainOptions) -> str:
    """Where the eval rows come from: the --eval-split file, else the --data they were
    split from (what messages about them name)."""
    eval_file = parse_eval_split(options.eval_split)
    return eval_file if isinstance(eval_file, str) else options.data
