"""The fields of a PEFT LoRA ``adapter_config.json`` that an import reads, checked.

PEFT's ``LoraConfig`` gives module ``name`` the rank ``rank_pattern[key]`` (else ``r``) and
the alpha ``alpha_pattern[key]`` (else ``lora_alpha``) for the first ``key`` in the file's
order for which ``re.match(rf"(.*\\.)?({key})$", name)`` matches (``get_pattern_key``).
A key is thus a module-name suffix on a dotted boundary, read as a regular expression.

The config is untrusted, and Python's ``re`` backtracks: a key such as ``(.*.*)*z`` holds
the interpreter (and with it every other thread of a server) for minutes on one module
name. So keys never run on ``re``:

- a key made of name characters and dots (``"q_proj"``, ``"model.layers.0.self_attn.v_proj"``,
  the overwhelmingly common case) is compared as the suffix it is, each ``.`` standing for
  any one character as in PEFT's regular expression;
- any other key runs on RE2, whose matching time is linear in the name. A key RE2 has no
  linear-time form for (look-around, back-references) is refused, as is one Python's
  ``re`` cannot read (PEFT could not load it either).

Keys are at most :data:`MAX_PATTERN_KEY_CHARS` characters and :data:`MAX_PATTERN_KEYS` per
field, so one lookup costs at most that many linear-time comparisons.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flora.errors import AdapterConfigError
from flora.linear_regex import compile_linear

__all__ = ["MAX_PATTERN_KEYS", "MAX_PATTERN_KEY_CHARS", "PatternKeys", "PeftLoraConfig"]

MAX_PATTERN_KEYS = 4096
MAX_PATTERN_KEY_CHARS = 256
# PEFT's LoraConfig defaults for fields a config leaves out.
DEFAULT_R = 8
DEFAULT_LORA_ALPHA = 8.0

# No regular-expression syntax but `.`: compared without a regex engine.
_PLAIN_KEY = re.compile(r"[^\\^$*+?{}\[\]|()]+")


def _plain_matches(key: str, name: str) -> bool:
    """``re.match(rf"(.*\\.)?({key})$", name)`` for a key whose only syntax is ``.``: the
    key spans the end of ``name`` and starts at its beginning or right after a dot."""
    n, m = len(name), len(key)
    if m > n or (m < n and name[n - m - 1] != "."):
        return False
    tail = name[n - m :]
    if tail == key:
        return True
    return "." in key and all(k in (".", c) for k, c in zip(key, tail, strict=True))


class _RegexKey:
    """A key with regex syntax, compiled as PEFT wraps it, on RE2."""

    __slots__ = ("_regex",)

    def __init__(self, field: str, key: str) -> None:
        try:
            self._regex = compile_linear(rf"(.*\.)?({key})$")
        except ValueError as exc:
            raise AdapterConfigError(
                f"PEFT {field} key {key!r} {exc}: pattern keys are module-name suffixes or "
                "regular expressions matched in linear time"
            ) from None

    def __call__(self, name: str) -> bool:
        return self._regex.match(name) is not None


class PatternKeys:
    """The keys of one PEFT pattern field (``rank_pattern`` or ``alpha_pattern``), in the
    file's order; :meth:`key_for` is PEFT's ``get_pattern_key`` without backtracking."""

    def __init__(self, field: str, keys: list[str]) -> None:
        """Raises ``AdapterConfigError`` naming ``field`` for too many or too long keys, or a
        key that cannot be matched safely (see the module docstring)."""
        if len(keys) > MAX_PATTERN_KEYS:
            raise AdapterConfigError(
                f"PEFT {field} has {len(keys)} keys; at most {MAX_PATTERN_KEYS} are read"
            )
        self._keys: list[tuple[str, Any]] = []
        for key in keys:
            if not key:
                raise AdapterConfigError(f"PEFT {field} has an empty key")
            if len(key) > MAX_PATTERN_KEY_CHARS:
                raise AdapterConfigError(
                    f"PEFT {field} key {key[:40]!r}... has {len(key)} characters; at most "
                    f"{MAX_PATTERN_KEY_CHARS} are read"
                )
            plain = _PLAIN_KEY.fullmatch(key) is not None
            self._keys.append((key, None if plain else _RegexKey(field, key)))

    def key_for(self, name: str) -> str | None:
        """The first key that selects module ``name`` (None: none does)."""
        for key, regex in self._keys:
            if _plain_matches(key, name) if regex is None else regex(name):
                return key
        return None


def _number(field: str, value: Any) -> float:
    """A JSON number as a finite float (JSON's ``1e999`` parses as infinity)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AdapterConfigError(f"PEFT {field} must be a number, got {_shown(value)}")
    try:
        out = float(value)
    except OverflowError:  # an int beyond float's range
        out = math.inf
    if not math.isfinite(out):
        raise AdapterConfigError(f"PEFT {field} must be finite, got {_shown(value)}")
    return out


def _rank(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterConfigError(f"PEFT {field} must be an integer >= 1, got {_shown(value)}")
    return value


def _flag(field: str, value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise AdapterConfigError(f"PEFT {field} must be true or false, got {_shown(value)}")
    return value


def _optional_text(field: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise AdapterConfigError(f"PEFT {field} must be a string or null, got {_shown(value)}")
    return value


def _pattern(field: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise AdapterConfigError(
            f"PEFT {field} must map module names or patterns to values, got {_shown(value)}"
        )
    return dict(value)


def _target_modules(value: Any) -> list[str] | str | None:
    # PEFT: a list of module-name suffixes, or one regex (fullmatch) / "all-linear". The
    # import takes the modules from the weights, so this is only checked, never matched.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise AdapterConfigError(
        f"PEFT target_modules must be a list of module names, a string or null, got {_shown(value)}"
    )


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class PeftLoraConfig:
    """What a LoRA import reads from PEFT's ``adapter_config.json``, each field checked.

    ``rank_for(name)`` / ``alpha_for(name)`` are the rank and alpha PEFT gives module
    ``name``; the scaling of its update is ``alpha / r`` (``alpha / sqrt(r)`` with
    ``use_rslora``).
    """

    r: int
    lora_alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    rank_keys: PatternKeys
    alpha_keys: PatternKeys
    use_rslora: bool
    fan_in_fan_out: bool
    target_modules: list[str] | str | None
    base_model_name_or_path: str | None
    task_type: str | None

    @classmethod
    def from_json(cls, cfg: Mapping[str, Any]) -> PeftLoraConfig:
        """Read and check the fields; raises ``AdapterConfigError`` naming the field."""
        rank_pattern = {
            str(k): _rank(f"rank_pattern[{k!r}]", v)
            for k, v in _pattern("rank_pattern", cfg.get("rank_pattern")).items()
        }
        alpha_pattern = {
            str(k): _number(f"alpha_pattern[{k!r}]", v)
            for k, v in _pattern("alpha_pattern", cfg.get("alpha_pattern")).items()
        }
        alpha = cfg.get("lora_alpha", DEFAULT_LORA_ALPHA)
        return cls(
            r=_rank("r", cfg.get("r", DEFAULT_R)),
            lora_alpha=_number("lora_alpha", alpha),
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            rank_keys=PatternKeys("rank_pattern", list(rank_pattern)),
            alpha_keys=PatternKeys("alpha_pattern", list(alpha_pattern)),
            use_rslora=_flag("use_rslora", cfg.get("use_rslora")),
            fan_in_fan_out=_flag("fan_in_fan_out", cfg.get("fan_in_fan_out")),
            target_modules=_target_modules(cfg.get("target_modules")),
            base_model_name_or_path=_optional_text(
                "base_model_name_or_path", cfg.get("base_model_name_or_path")
            ),
            task_type=_optional_text("task_type", cfg.get("task_type")),
        )

    def rank_for(self, name: str) -> tuple[int, str]:
        """PEFT's rank for module ``name`` and the field it comes from."""
        key = self.rank_keys.key_for(name)
        if key is None:
            return self.r, "r"
        return self.rank_pattern[key], f"rank_pattern[{key!r}]"

    def alpha_for(self, name: str) -> float:
        key = self.alpha_keys.key_for(name)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def scaling(self, name: str, r: int) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rslora) for module ``name`` of rank r."""
        return self.alpha_for(name) / (math.sqrt(r) if self.use_rslora else r)
