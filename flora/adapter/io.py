"""Save and load adapter format v1 (directory or single ``.flora`` file)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flora.adapter.adapter import FULL_PREFIX, Adapter, core_key, factor_key
from flora.adapter.archive import ARCHIVE_META_KEY, embedded_config_text
from flora.adapter.container import (
    DEFAULT_MAX_HEADER_BYTES,
    all_finite,
    atomic_write,
    decode_checked,
    encode_tensors,
    read_header,
    strict_json_loads,
    tensors_sha256,
)
from flora.adapter.schema import DEFAULT_MAX_RANK, AdapterHeader, AdapterModule, parse_header
from flora.adapter.validate import (
    check_finite,
    check_modules_follow_config,
    check_tensor_table,
    validate_against,
)
from flora.errors import AdapterError, AdapterFormatError, HeaderTooLargeError, NonFiniteError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
ARCHIVE_SUFFIX = ".flora"
# Metadata keys a weights file may carry: safetensors' own "format" and our config.
_ALLOWED_META = {"format", ARCHIVE_META_KEY}


def _library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flora-serve")
    except PackageNotFoundError:
        return "0.0.0+unknown"


# -- save ---------------------------------------------------------------------------


def adapter_from_model(
    model: nn.Module,
    base_model_id: str | None,
    *,
    task: str | None = None,
    labels: list[str] | None = None,
    **metadata: Any,
) -> Adapter:
    """Extract the adapter of an injected model (cores, factors, train_modules params).

    The fingerprint is the base's (``flora.base_fingerprint``), with the parameters of
    ``train_modules`` left out: training changes them, and the adapter replaces them.
    """
    from flora.injection import adapter_layers, get_config

    config = get_config(model)
    layers = list(adapter_layers(model))
    if config is None or not layers:
        raise AdapterError("model has no FLoRA adapters; call flora.inject first")
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, AdapterModule] = {}
    for name, layer in layers:
        if layer.merged:
            raise AdapterError(f"layer {name!r} is merged; unmerge the model before saving")
        modules[name] = AdapterModule(spec=layer.spec, ranks=tuple(layer.ranks))
        tensors[core_key(name)] = layer.core.detach().to("cpu", copy=True)
        for m, u in enumerate(layer.factors):
            tensors[factor_key(name, m)] = u.detach().to("cpu", copy=True)
    for module_name in trained_module_names(model, config.train_modules):
        for param, value in model.get_submodule(module_name).state_dict().items():
            tensors[f"{FULL_PREFIX}{module_name}.{param}"] = value.detach().to("cpu", copy=True)
    return Adapter(
        config=config,
        tensors=tensors,
        modules=modules,
        base_model_id=base_model_id,
        fingerprint=fingerprint_without_trained(model, config.train_modules),
        task=task,
        labels=list(labels) if labels is not None else None,
        metadata=dict(metadata),
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        library_version=_library_version(),
    )


def trained_module_names(
    model: nn.Module | Iterable[str], train_modules: list[str] | str
) -> list[str]:
    """Outermost modules selected by ``train_modules`` (nested matches are inside them).

    ``model`` is a model or the qualified names of its modules, parents before children
    (``named_modules`` order), e.g. taken before a serving runtime wrapped any of them.
    """
    from flora.config import name_matches

    out: list[str] = []
    if not train_modules:
        return out
    names = (n for n, _ in model.named_modules()) if isinstance(model, nn.Module) else model
    for name in names:
        if name and name_matches(name, train_modules):
            if any(name.startswith(p + ".") for p in out):
                continue
            out.append(name)
    return out


def fingerprint_without_trained(model: nn.Module, train_modules: list[str] | str) -> str:
    """``base_fingerprint`` of ``model`` minus the state of its ``train_modules``."""
    from flora.fingerprint import base_fingerprint, base_state_items

    if not train_modules:
        return base_fingerprint(model)
    prefixes = tuple(n + "." for n in trained_module_names(model, train_modules))
    state = {k: v for k, v in base_state_items(model) if not k.startswith(prefixes)}
    return base_fingerprint(state)


def encode_adapter(adapter: Adapter, *, archive: bool) -> tuple[bytes, bytes | None]:
    """``(weights, config_json)``; an archive has the config inside the weights file.

    The config records the weights' ``tensors_sha256`` (``container.tensors_sha256``), so
    a config and a weights file from two different saves are refused as a pair."""
    weights = encode_tensors(adapter.tensors, {"format": "pt"})
    _, entries = read_header(weights, max_header_bytes=len(weights), what=WEIGHTS_NAME)
    header = replace(adapter.header(), tensors_sha256=tensors_sha256(weights, entries))
    config_json = json.dumps(header.to_json_dict(), indent=2, sort_keys=False)
    if archive:
        return encode_tensors(adapter.tensors, {ARCHIVE_META_KEY: config_json}), None
    return weights, config_json.encode()


def save_adapter(
    model_or_adapter: nn.Module | Adapter,
    path: str | os.PathLike[str],
    base_model_id: str | None = None,
    *,
    task: str | None = None,
    labels: list[str] | None = None,
    archive: bool = False,
    **metadata: Any,
) -> Path:
    """Write the adapter of an injected model (or an ``Adapter``) to ``path``.

    A directory gets ``adapter_config.json`` + ``adapter.safetensors``; with
    ``archive=True`` or a path ending in ``.flora``, one safetensors file whose
    ``__metadata__["adapter_config"]`` holds the config. Every file is written through a
    temp file, fsync and rename, weights before config. The config records the
    ``tensors_sha256`` of the weights it was saved with, so a crash between the two
    renames (new weights beside the previous save's config) leaves a pair that
    ``load_adapter`` refuses rather than a mixed adapter it accepts. Returns ``path``.
    """
    if isinstance(model_or_adapter, Adapter):
        adapter = model_or_adapter
    else:
        adapter = adapter_from_model(
            model_or_adapter, base_model_id, task=task, labels=labels, **metadata
        )
    path = Path(path)
    archive = archive or path.suffix == ARCHIVE_SUFFIX
    weights, config_json = encode_adapter(adapter, archive=archive)
    if archive:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, weights)
    else:
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / WEIGHTS_NAME, weights)
        assert config_json is not None
        atomic_write(path / CONFIG_NAME, config_json)
    return path


# -- load ---------------------------------------------------------------------------


def load_adapter(
    source: str | os.PathLike[str] | bytes,
    *,
    max_rank: int = DEFAULT_MAX_RANK,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    base: nn.Module | None = None,
) -> Adapter:
    """Load and fully validate an adapter: a directory, a ``.flora`` file, or its bytes.

    Nothing is decoded before the header length is checked against ``max_header_bytes``
    and the config against its allowlist; tensors must be F16/BF16/F32, named and shaped
    as the config says, finite, with ranks in ``[1, min(max_rank, mode size)]``. With
    ``base``, the adapter is also checked against that model (``validate_against``).

    Raises:
        AdapterError: a subclass naming what is wrong (see ``flora.errors``).
    """
    if isinstance(source, bytes | bytearray | memoryview):
        adapter = load_archive_bytes(
            bytes(source), max_rank=max_rank, max_header_bytes=max_header_bytes
        )
    else:
        path = Path(source)
        if path.is_dir():
            config_bytes = _read_capped(path / CONFIG_NAME, max_header_bytes)
            weights = _read_file(path / WEIGHTS_NAME)
            adapter = load_adapter_bytes(
                config_bytes, weights, max_rank=max_rank, max_header_bytes=max_header_bytes
            )
        else:
            adapter = load_archive_bytes(
                _read_file(path), max_rank=max_rank, max_header_bytes=max_header_bytes
            )
    if base is not None:
        from flora.fingerprint import describe_base

        fingerprint = fingerprint_without_trained(base, adapter.config.train_modules)
        validate_against(adapter, describe_base(base), fingerprint)
    return adapter


def load_archive_bytes(
    data: bytes,
    *,
    max_rank: int = DEFAULT_MAX_RANK,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> Adapter:
    """Load the single-file form from bytes (config in ``__metadata__``)."""
    parsed = read_header(data, max_header_bytes=max_header_bytes, what="adapter archive")
    config_text = embedded_config_text(parsed[0], "adapter archive")
    return _load(config_text, data, max_rank, max_header_bytes, parsed)


def load_adapter_bytes(
    config_bytes: bytes | str,
    weights_bytes: bytes,
    *,
    max_rank: int = DEFAULT_MAX_RANK,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> Adapter:
    """Load the directory form from the bytes of its two files."""
    if len(config_bytes) > max_header_bytes:
        raise HeaderTooLargeError(f"{CONFIG_NAME} is larger than {max_header_bytes} bytes")
    return _load(config_bytes, weights_bytes, max_rank, max_header_bytes)


def _load(
    config_text: bytes | str,
    data: bytes,
    max_rank: int,
    max_header_bytes: int,
    parsed: tuple[dict[str, str], dict[str, dict[str, Any]]] | None = None,
) -> Adapter:
    """Validate and decode; ``parsed`` is ``read_header(data)`` when the caller has it.

    The safetensors header is parsed and checked once (length cap, JSON, offsets), then
    reused for the table check, the decode and the finiteness pass.
    """
    header = parse_header(strict_json_loads(config_text, CONFIG_NAME), max_rank=max_rank)
    check_modules_follow_config(header)
    if parsed is None:
        parsed = read_header(data, max_header_bytes=max_header_bytes, what=WEIGHTS_NAME)
    metadata, entries = parsed
    unknown_meta = sorted(set(metadata) - _ALLOWED_META)
    if unknown_meta:
        raise AdapterFormatError(f"{WEIGHTS_NAME}: unknown __metadata__ keys {unknown_meta}")
    # Names and shapes are checked from the header, before any tensor is decoded.
    check_tensor_table(header, {k: v["shape"] for k, v in entries.items()})
    tensors = decode_checked(data, what=WEIGHTS_NAME)
    if not all_finite(data, entries):
        # Rare path: the one-pass byte check failed; name the first offending tensor.
        check_finite(tensors)
        raise NonFiniteError(f"{WEIGHTS_NAME}: the data section holds NaN or Inf values")
    _check_pair(header, data, entries)
    return _adapter_from(header, tensors)


def _check_pair(header: AdapterHeader, data: bytes, entries: dict[str, dict[str, Any]]) -> None:
    """The weights must be the ones the config was saved with, when the config says which
    (configs written before ``tensors_sha256`` existed, and PEFT imports, do not)."""
    if header.tensors_sha256 is None:
        return
    found = tensors_sha256(data, entries)
    if found != header.tensors_sha256:
        raise AdapterFormatError(
            f"{WEIGHTS_NAME} does not belong to {CONFIG_NAME}: the config was saved with "
            f"tensors {header.tensors_sha256}, these weights hash to {found} (a save cut "
            "off between its two files, or files of two adapters mixed)"
        )


def _adapter_from(header: AdapterHeader, tensors: dict[str, torch.Tensor]) -> Adapter:
    return Adapter(
        config=header.config,
        tensors=tensors,
        modules=header.modules,
        base_model_id=header.base_model_id,
        fingerprint=header.fingerprint,
        task=header.task,
        labels=header.labels,
        metadata=header.metadata,
        created_at=header.created_at,
        library_version=header.library_version,
    )


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise AdapterFormatError(f"{path.name} not found") from exc
    except IsADirectoryError as exc:
        raise AdapterFormatError(f"{path.name} is a directory, not a file") from exc


def _read_capped(path: Path, cap: int) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(cap + 1)
    except FileNotFoundError as exc:
        raise AdapterFormatError(f"{path.name} not found") from exc
    if len(data) > cap:
        raise HeaderTooLargeError(f"{path.name} is larger than {cap} bytes")
    return data
