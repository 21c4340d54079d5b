"""FloraConfig: what a user asks for when adapting a model with FLoRA."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from flora.linear_regex import compile_linear

if TYPE_CHECKING:
    from flora.kinds import ModuleSpec

__all__ = ["FloraConfig", "check_patterns", "name_matches"]

# Modes after the first two of a conv weight (out, in/groups, k_1..k_m) are kernel modes.
_CONV_KINDS = frozenset({"conv1d", "conv2d", "conv3d"})


def name_matches(name: str, patterns: Sequence[str] | str) -> bool:
    """Whether a qualified module name is selected by ``patterns``.

    A string is a regular expression that must match the whole name (run on RE2, in
    time linear in the name: ``flora.linear_regex``); a list holds
    suffixes matched on whole dotted components (``"q_proj"`` matches
    ``"model.layers.0.self_attn.q_proj"`` but not ``"model.xq_proj"``).
    """
    if isinstance(patterns, str):  # linear time: patterns come with adapters
        return compile_linear(patterns).fullmatch(name) is not None
    return any(_is_suffix(name, p) for p in patterns)


def _is_suffix(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


@dataclass
class FloraConfig:
    """Which modules get a FLoRA adapter and with which ranks.

    The update of a weight with modes ``(d_1..d_N)`` is
    ``dW = scale * G x_1 U_1 ... x_N U_N`` with core ``G`` of shape ``(r_1..r_N)``.
    """

    target_modules: list[str] | str
    """Modules to adapt: a list of name suffixes (whole dotted components) or a regex
    string that must fullmatch the qualified module name."""

    rank: int = 8
    """Rank of channel/feature modes (out, in/groups, num, dim), clamped to each mode's
    size (so depthwise convs, whose in/groups is 1, work with the same setting)."""

    kernel_rank: int | None = None
    """Rank of conv kernel modes (k_1..k_m), clamped to the kernel size; ``None`` keeps
    kernel modes whole (r = k)."""

    scale: float = 1.0
    """The plain multiplier ``s`` of the update (the paper uses 1.0 for linear, 4.0 in
    its conv example)."""

    dropout: float = 0.0
    """Dropout probability on the adapter branch input (not applied to embedding ids)."""

    rank_pattern: dict[str, list[int]] = field(default_factory=dict)
    """Explicit rank tuples per module: key is an exact qualified name or a name suffix
    (exact match wins, then the longest suffix); value has one rank per weight mode,
    each in [1, mode size] (not clamped: a wrong tuple is an error)."""

    train_modules: list[str] | str = field(default_factory=list)
    """Modules trained fully and saved whole (e.g. a new classifier head); same matching
    rules as ``target_modules``."""

    def __post_init__(self) -> None:
        self.target_modules = check_patterns("target_modules", self.target_modules, True)
        self.train_modules = check_patterns("train_modules", self.train_modules, False)
        _check_rank("rank", self.rank)
        if self.kernel_rank is not None:
            _check_rank("kernel_rank", self.kernel_rank)
        if isinstance(self.scale, bool) or not isinstance(self.scale, int | float):
            raise ValueError(f"scale must be a number, got {self.scale!r}")
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be finite, got {self.scale!r}")
        self.scale = float(self.scale)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise ValueError(f"dropout must be a number, got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        self.rank_pattern = _check_rank_pattern(self.rank_pattern)

    # -- matching -------------------------------------------------------------------

    def is_target(self, name: str) -> bool:
        """Whether module ``name`` gets an adapter."""
        return bool(name) and name_matches(name, self.target_modules)

    def is_trained(self, name: str) -> bool:
        """Whether module ``name`` is trained fully (``train_modules``)."""
        return bool(name) and bool(self.train_modules) and name_matches(name, self.train_modules)

    def ranks_for(self, name: str, spec: ModuleSpec) -> tuple[int, ...]:
        """Core shape ``(r_1..r_N)`` for module ``name`` with weight ``spec.weight_shape``.

        ``rank_pattern`` wins (validated against the shape); otherwise ``rank`` for the
        channel modes and ``kernel_rank`` for conv kernel modes, each clamped to the mode.
        """
        shape = tuple(int(d) for d in spec.weight_shape)
        explicit = self._pattern_for(name)
        if explicit is not None:
            if len(explicit) != len(shape):
                raise ValueError(
                    f"rank_pattern for {name!r} has {len(explicit)} ranks, "
                    f"weight {shape} has {len(shape)} modes"
                )
            for mode, (r, d) in enumerate(zip(explicit, shape, strict=True)):
                if r > d:
                    raise ValueError(
                        f"rank_pattern for {name!r}: rank {r} of mode {mode} exceeds its size {d}"
                    )
            return tuple(explicit)
        ranks = []
        for mode, d in enumerate(shape):
            is_kernel = spec.kind in _CONV_KINDS and mode >= 2
            r = (
                (self.kernel_rank if self.kernel_rank is not None else d)
                if is_kernel
                else self.rank
            )
            ranks.append(min(r, d))
        return tuple(ranks)

    def _pattern_for(self, name: str) -> tuple[int, ...] | None:
        if name in self.rank_pattern:
            return tuple(self.rank_pattern[name])
        hits = [k for k in self.rank_pattern if _is_suffix(name, k)]
        if not hits:
            return None
        return tuple(self.rank_pattern[max(hits, key=len)])

    # -- JSON ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists, not tuples); ``from_dict`` inverts it."""
        return {
            "target_modules": _pattern_json(self.target_modules),
            "rank": self.rank,
            "kernel_rank": self.kernel_rank,
            "scale": self.scale,
            "dropout": self.dropout,
            "rank_pattern": {k: list(v) for k, v in self.rank_pattern.items()},
            "train_modules": _pattern_json(self.train_modules),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FloraConfig:
        """Build from ``to_dict()`` output; ValueError naming any unknown keys."""
        if not isinstance(d, Mapping):
            raise ValueError(f"FloraConfig.from_dict needs a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown FloraConfig keys: {', '.join(map(str, unknown))}")
        if "target_modules" not in d:
            raise ValueError("FloraConfig needs target_modules")
        return cls(**dict(d))


def _pattern_json(p: list[str] | str) -> list[str] | str:
    return p if isinstance(p, str) else list(p)


def check_patterns(field_name: str, value: Any, required: bool) -> list[str] | str:
    """``value`` as a module selection (``target_modules`` / ``train_modules``): a regex
    string (empty: nothing, ``[]``) or a list of non-empty names. Raises ValueError
    naming ``field_name``."""
    if isinstance(value, str):
        if not value:
            if required:
                raise ValueError(f"{field_name} must not be empty")
            return []
        try:
            compile_linear(value)
        except ValueError as exc:
            raise ValueError(f"{field_name} {exc}") from None
        return value
    if not isinstance(value, Sequence) or not all(isinstance(s, str) and s for s in value):
        raise ValueError(f"{field_name} must be a regex string or a list of non-empty names")
    if required and not value:
        raise ValueError(f"{field_name} must not be empty")
    return list(value)


def _check_rank(field_name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field_name} must be an integer >= 1, got {value!r}")


def _check_rank_pattern(value: Any) -> dict[str, list[int]]:
    if not isinstance(value, Mapping):
        raise ValueError("rank_pattern must map module names to rank lists")
    out: dict[str, list[int]] = {}
    for name, ranks in value.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"rank_pattern key {name!r} must be a non-empty module name")
        if isinstance(ranks, str | bytes) or not isinstance(ranks, Sequence) or not ranks:
            raise ValueError(f"rank_pattern[{name!r}] must be a non-empty list of ranks")
        for r in ranks:
            _check_rank(f"rank_pattern[{name!r}]", r)
        out[name] = [int(r) for r in ranks]
    return out
