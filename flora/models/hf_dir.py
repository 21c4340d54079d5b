"""Load any local Hugging Face model directory; decide its kind with registered rules.

The kind comes from ``config.json``'s ``architectures`` (checked against transformers' auto
mappings) or, for sentence-transformers directories, from ``modules.json``. Rules are
registered explicitly in :func:`kind_rules`; the first match wins.

The base fingerprint is computed on the fp32 weights at first load and cached in
``$FLORA_HOME/fingerprints/`` keyed by the directory's resolved path, and the size and
mtime of its config and weight files; any change to those files recomputes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from flora.models import hf_loaders
from flora.models.errors import UnsupportedModelError
from flora.models.registry import KindRegistry, KindRule, LoadRequest
from flora.models.storage import atomic_write_json, read_json
from flora.models.types import LoadedModel


def _architectures_in(mapping_name: str) -> Callable[[dict, Path], bool]:
    """Match when an entry of ``config["architectures"]`` is a class of that auto mapping."""

    def matches(config: dict, directory: Path) -> bool:
        from transformers.models.auto import modeling_auto

        names: set[str] = set()
        for value in getattr(modeling_auto, mapping_name).values():
            names.update((value,) if isinstance(value, str) else value)
        return any(a in names for a in config.get("architectures") or [])

    return matches


def _is_sentence_transformers(config: dict, directory: Path) -> bool:
    return (directory / "modules.json").is_file()


def kind_rules() -> KindRegistry:
    """The default rules, most specific first."""
    rules = KindRegistry()
    rules.register(
        KindRule(
            kind="text-encoder",
            description="sentence-transformers directory (modules.json + pooling config)",
            matches=_is_sentence_transformers,
            load=hf_loaders.load_text_encoder,
        )
    )
    rules.register(
        KindRule(
            kind="text-classifier",
            description="architectures names a *ForSequenceClassification class",
            matches=_architectures_in("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
            load=hf_loaders.load_text_classifier,
        )
    )
    rules.register(
        KindRule(
            kind="causal-lm",
            description="architectures names a causal LM class (*ForCausalLM, GPT2LMHeadModel)",
            matches=_architectures_in("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
            load=hf_loaders.load_causal_lm,
        )
    )
    rules.register(
        KindRule(
            kind="text-encoder",
            description="architectures names a bare encoder class (BertModel, ...): mean pooling",
            matches=_architectures_in("MODEL_MAPPING_NAMES"),
            load=hf_loaders.load_text_encoder,
        )
    )
    rules.register(
        KindRule(
            kind="text-encoder",
            description="architectures names a masked-LM class (BertForMaskedLM, ...): the "
            "encoder without its LM head, mean pooling",
            matches=_architectures_in("MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
            load=hf_loaders.load_text_encoder,
        )
    )
    return rules


def resolve_rule(directory: Path, rules: KindRegistry | None = None) -> KindRule:
    """The rule that decides ``directory``'s kind.

    Raises:
        UnsupportedModelError: no config.json, or no rule recognises it.
    """
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UnsupportedModelError(f"{directory} is not a Hugging Face model directory")
    config = read_json(config_path)
    rule = (rules or kind_rules()).resolve(config, directory)
    if rule is None:
        raise UnsupportedModelError(
            f"{directory}: cannot tell the task kind from architectures="
            f"{config.get('architectures')!r} model_type={config.get('model_type')!r}; "
            "supported: causal LM, sequence classification, text encoder"
        )
    return rule


def _stamp(directory: Path) -> list[list[object]]:
    files: Iterable[Path] = sorted(
        p for p in directory.iterdir() if p.suffix in {".json", ".safetensors"} and p.is_file()
    )
    out: list[list[object]] = []
    for p in files:
        st = p.stat()
        out.append([p.name, st.st_size, st.st_mtime_ns])
    return out


def _cache_path(home: Path, directory: Path) -> Path:
    key = hashlib.sha256(str(directory).encode()).hexdigest()[:32]
    return home / "fingerprints" / f"{key}.json"


def cached_fingerprint(home: Path, directory: Path) -> str | None:
    """The cached fingerprint of ``directory`` if its files did not change since."""
    path = _cache_path(home, directory)
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    if data.get("path") != str(directory) or data.get("stamp") != _stamp(directory):
        return None
    value = data.get("fingerprint")
    return value if isinstance(value, str) else None


def load_directory(
    directory: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    home: Path,
    rules: KindRegistry | None = None,
) -> LoadedModel:
    """Load a local HF directory; see the module docstring for kind and fingerprint rules."""
    from flora.fingerprint import base_fingerprint

    directory = directory.resolve()
    rule = resolve_rule(directory, rules)
    fingerprint = cached_fingerprint(home, directory)
    request = LoadRequest(directory, str(directory), fingerprint or "", device, dtype)
    if fingerprint is not None:
        return rule.load(request)
    # First sight: load in fp32 on the CPU, fingerprint, then move to the requested place.
    stamp = _stamp(directory)
    cpu32 = dataclasses.replace(request, device=torch.device("cpu"), dtype=torch.float32)
    loaded = rule.load(cpu32)
    fingerprint = base_fingerprint(loaded.model)
    atomic_write_json(
        _cache_path(home, directory),
        {"path": str(directory), "stamp": stamp, "fingerprint": fingerprint},
    )
    loaded.model.to(device=device, dtype=dtype)
    return dataclasses.replace(loaded, fingerprint=fingerprint)
