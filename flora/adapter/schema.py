"""adapter_config.json: an allowlisted schema, checked before any tensor is decoded.

Only the fields below may appear (at every level but the free-form ``metadata``), and no
key anywhere may name code to run (``auto_map`` and friends): an adapter is data only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flora.config import FloraConfig
from flora.errors import AdapterConfigError, RankLimitError
from flora.kinds import ModuleSpec

FORMAT_VERSION = 1
METHOD = "flora"
DEFAULT_MAX_RANK = 256

_REQUIRED = {"format_version", "method", "config", "base_model", "modules"}
TENSORS_SHA256 = "tensors_sha256"
_OPTIONAL = {"task", "labels", "created_at", "library_version", "metadata", TENSORS_SHA256}
_MODULE_KEYS = {"kind", "weight_shape", "groups", "ranks"}
# Keys that other ecosystems use to point at code; refused wherever they appear.
_CODE_KEYS = {
    "auto_map",
    "_target_",
    "__class__",
    "__reduce__",
    "trust_remote_code",
    "custom_code",
}
_FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}")
_SHORT_TEXT = 256


@dataclass(frozen=True)
class AdapterModule:
    """One adapted module: the base module it expects (``spec``) and its core shape."""

    spec: ModuleSpec
    ranks: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {**self.spec.to_dict(), "ranks": list(self.ranks)}


@dataclass(frozen=True)
class AdapterHeader:
    """Everything in adapter_config.json, validated."""

    config: FloraConfig
    base_model_id: str | None
    fingerprint: str | None
    modules: dict[str, AdapterModule]
    task: str | None = None
    labels: list[str] | None = None
    created_at: str | None = None
    library_version: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors_sha256: str | None = None
    """``container.tensors_sha256`` of the weights this config was saved with: it ties the
    two files of a directory together (None: a config from before the field existed)."""

    def to_json_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "method": METHOD,
            "config": self.config.to_dict(),
            "base_model": {"id": self.base_model_id, "fingerprint": self.fingerprint},
            "modules": {name: m.to_dict() for name, m in sorted(self.modules.items())},
            "task": self.task,
            "labels": self.labels,
            "created_at": self.created_at,
            "library_version": self.library_version,
            "metadata": self.metadata,
        }
        if self.tensors_sha256 is not None:
            doc[TENSORS_SHA256] = self.tensors_sha256
        return doc


def parse_header(doc: Any, *, max_rank: int = DEFAULT_MAX_RANK) -> AdapterHeader:
    """Validate a decoded adapter_config.json document.

    Raises:
        AdapterConfigError: unknown/missing fields, wrong version/method, code references.
        RankLimitError: a rank below 1, above ``max_rank`` or above its mode's size.
    """
    if not isinstance(doc, dict):
        raise AdapterConfigError("adapter config must be a JSON object")
    _refuse_code_keys(doc, "adapter config")
    unknown = sorted(set(doc) - _REQUIRED - _OPTIONAL)
    if unknown:
        raise AdapterConfigError(f"adapter config has unknown fields: {', '.join(unknown)}")
    missing = sorted(_REQUIRED - set(doc))
    if missing:
        raise AdapterConfigError(f"adapter config is missing fields: {', '.join(missing)}")
    if doc["format_version"] != FORMAT_VERSION or isinstance(doc["format_version"], bool):
        raise AdapterConfigError(
            f"format_version {doc['format_version']!r} is not supported (expected 1)"
        )
    if doc["method"] != METHOD:
        raise AdapterConfigError(f"method {doc['method']!r} is not supported (expected 'flora')")
    try:
        config = FloraConfig.from_dict(doc["config"])
    except (ValueError, TypeError) as exc:
        raise AdapterConfigError(f"config: {exc}") from exc
    base_id, fingerprint = _parse_base_model(doc["base_model"])
    modules = _parse_modules(doc["modules"], max_rank)
    labels = doc.get("labels")
    if labels is not None and (
        not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)
    ):
        raise AdapterConfigError("labels must be null or a list of strings")
    metadata = doc.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise AdapterConfigError("metadata must be a JSON object")
    tensors_sha256 = doc.get(TENSORS_SHA256)
    if tensors_sha256 is not None and (
        not isinstance(tensors_sha256, str) or not _FINGERPRINT_RE.fullmatch(tensors_sha256)
    ):
        raise AdapterConfigError(f"{TENSORS_SHA256} must be null or 'sha256:<64 hex>'")
    return AdapterHeader(
        config=config,
        base_model_id=base_id,
        fingerprint=fingerprint,
        modules=modules,
        task=_optional_text(doc, "task"),
        labels=labels,
        created_at=_optional_text(doc, "created_at"),
        library_version=_optional_text(doc, "library_version"),
        metadata=metadata,
        tensors_sha256=tensors_sha256,
    )


def _refuse_code_keys(node: Any, where: str) -> None:
    # Iterative walk: the JSON parser already bounds depth, but no recursion here either.
    stack = [(node, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key in _CODE_KEYS:
                    raise AdapterConfigError(
                        f"{path}: field {key!r} references code; adapters are data only"
                    )
                stack.append((value, f"{path}.{key}"))
        elif isinstance(item, list):
            stack.extend((v, path) for v in item)


def _optional_text(doc: Mapping[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is not None and (not isinstance(value, str) or len(value) > _SHORT_TEXT):
        raise AdapterConfigError(f"{key} must be null or a string of at most {_SHORT_TEXT} chars")
    return value


def _parse_base_model(value: Any) -> tuple[str | None, str | None]:
    if not isinstance(value, dict) or set(value) - {"id", "fingerprint"}:
        raise AdapterConfigError("base_model must be an object with only 'id' and 'fingerprint'")
    base_id, fingerprint = value.get("id"), value.get("fingerprint")
    if base_id is not None and (not isinstance(base_id, str) or len(base_id) > _SHORT_TEXT):
        raise AdapterConfigError("base_model.id must be null or a short string")
    if fingerprint is not None and (
        not isinstance(fingerprint, str) or not _FINGERPRINT_RE.fullmatch(fingerprint)
    ):
        raise AdapterConfigError("base_model.fingerprint must be null or 'sha256:<64 hex>'")
    return base_id, fingerprint


def _parse_modules(value: Any, max_rank: int) -> dict[str, AdapterModule]:
    if not isinstance(value, dict) or not value:
        raise AdapterConfigError("modules must be a non-empty object")
    out: dict[str, AdapterModule] = {}
    for name, entry in value.items():
        if not name or not isinstance(entry, dict) or set(entry) != _MODULE_KEYS:
            raise AdapterConfigError(
                f"module {name!r} must have exactly the fields {sorted(_MODULE_KEYS)}"
            )
        try:
            spec = ModuleSpec.from_dict(entry)
        except (ValueError, TypeError) as exc:
            raise AdapterConfigError(f"module {name!r}: {exc}") from exc
        ranks = entry["ranks"]
        if (
            not isinstance(ranks, list)
            or len(ranks) != len(spec.weight_shape)
            or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks)
        ):
            raise AdapterConfigError(
                f"module {name!r}: ranks must be {len(spec.weight_shape)} integers"
            )
        for mode, (r, d) in enumerate(zip(ranks, spec.weight_shape, strict=True)):
            if not 1 <= r <= max_rank or r > d:
                raise RankLimitError(
                    f"module {name!r}: rank {r} of mode {mode} is outside [1, min({max_rank}, "
                    f"mode size {d})]"
                )
        out[name] = AdapterModule(spec=spec, ranks=tuple(ranks))
    return out
