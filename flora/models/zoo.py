"""``load`` / ``prepare``: the public entry points of the model zoo.

An embedded model is converted once into ``$FLORA_HOME/models/<name>/``; the directory is
complete iff its manifest ``flora_model.json`` exists with the current format version (the
manifest is written last and the directory appears by an atomic rename). Its base
fingerprint is computed at conversion from the fp32 weights and stored in
``fingerprint.json``, so it never depends on the runtime device or dtype.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from pathlib import Path

import torch

from flora.models import hf_dir
from flora.models.catalog import embedded_models
from flora.models.errors import UnknownModelError
from flora.models.packages import package_dir, package_version
from flora.models.registry import EmbeddedModel, LoadRequest, ModelRegistry
from flora.models.storage import (
    atomic_directory,
    conversion_lock,
    models_dir,
    read_json,
    remove_stale_temporaries,
    write_json,
)
from flora.models.storage import (
    home as resolve_home,
)
from flora.models.types import LoadedModel

log = logging.getLogger(__name__)

MANIFEST = "flora_model.json"
FINGERPRINT = "fingerprint.json"


def _is_complete(directory: Path, spec: EmbeddedModel) -> bool:
    manifest = directory / MANIFEST
    if not (manifest.is_file() and (directory / FINGERPRINT).is_file()):
        return False
    try:
        data = read_json(manifest)
    except (OSError, ValueError):
        return False
    return data.get("name") == spec.name and data.get("format_version") == spec.format_version


def _convert(spec: EmbeddedModel, final: Path) -> None:
    from flora.fingerprint import base_fingerprint

    source = package_dir(spec.package, model=spec.name, pip_spec=spec.pip_spec)
    with atomic_directory(final) as tmp:
        model = spec.convert(source, tmp)
        # The converted fp32 weights are the canonical base: fingerprint them once here.
        fingerprint = base_fingerprint(model)
        write_json(tmp / FINGERPRINT, {"fingerprint": fingerprint})
        write_json(
            tmp / MANIFEST,
            {
                "name": spec.name,
                "kind": spec.kind,
                "format_version": spec.format_version,
                "source": {"pip": spec.pip_spec, "version": package_version(spec.pip_spec)},
                "created_at": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        )


def prepare(
    name: str, home: str | os.PathLike[str] | None = None, *, registry: ModelRegistry | None = None
) -> Path:
    """Convert the embedded model ``name`` if needed; return its directory.

    Idempotent and safe to interrupt or run concurrently: conversion happens under an
    inter-process lock into a temporary directory that is renamed into place.

    Raises:
        UnknownModelError: ``name`` is not registered.
        ModelPackageMissingError: its weights package is not installed.
    """
    registry = registry or embedded_models()
    spec = registry.get(name)
    if spec is None:
        raise UnknownModelError(
            f"unknown model {name!r}; embedded models: {', '.join(registry.names())} "
            "(or pass the path of a local Hugging Face model directory)"
        )
    final = models_dir(resolve_home(home)) / spec.name
    if _is_complete(final, spec):
        return final
    # Fail fast with the pip command before taking the lock.
    package_dir(spec.package, model=spec.name, pip_spec=spec.pip_spec)
    with conversion_lock(final):
        if not _is_complete(final, spec):  # another process may have finished meanwhile
            remove_stale_temporaries(final)
            log.info(
                "preparing %s once into %s; about %.0f s on 2 CPU cores",
                spec.name,
                final,
                spec.prepare_seconds,
            )
            started = time.perf_counter()
            _convert(spec, final)
            log.info("prepared %s in %.1f s", spec.name, time.perf_counter() - started)
    return final


def load(
    name_or_path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    home: str | os.PathLike[str] | None = None,
    registry: ModelRegistry | None = None,
) -> LoadedModel:
    """Load an embedded model by name, or a local Hugging Face model directory by path.

    Returns a :class:`LoadedModel`: the module in eval mode on ``device`` in ``dtype``, its
    preprocessor (tokenizer or ``ImageTransform``), task kind, base fingerprint, labels,
    context length and the safetensors file it came from.
    """
    registry = registry or embedded_models()
    device = torch.device(device)
    spec = registry.get(str(name_or_path))
    if spec is not None:
        directory = prepare(spec.name, home, registry=registry)
        return spec.load(_request(directory, spec.name, device, dtype))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        manifest = path / MANIFEST
        if manifest.is_file():
            # A converted directory given by path (e.g. copied into an image).
            converted = registry.get(str(read_json(manifest).get("name")))
            if converted is not None and _is_complete(path, converted):
                return converted.load(_request(path, converted.name, device, dtype))
        return hf_dir.load_directory(path, device=device, dtype=dtype, home=resolve_home(home))
    raise UnknownModelError(
        f"unknown model {str(name_or_path)!r}: not an embedded model "
        f"({', '.join(registry.names())}) and not a directory"
    )


def _request(directory: Path, name: str, device: torch.device, dtype: torch.dtype) -> LoadRequest:
    fingerprint = str(read_json(directory / FINGERPRINT)["fingerprint"])
    return LoadRequest(
        directory=directory, name=name, fingerprint=fingerprint, device=device, dtype=dtype
    )
