"""The single-file form of an adapter (``*.flora``, uploads): one safetensors file whose
``__metadata__["adapter_config"]`` holds the config JSON.

:func:`pack_single_file` turns the directory form (config + weights) into it by rewriting
only the safetensors header, so the same two files always give the same bytes;
:func:`embedded_config` and :func:`read_embedded_config` read the config back without
decoding a tensor. Full validation stays with ``io.load_adapter``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flora.adapter.container import (
    DEFAULT_MAX_HEADER_BYTES,
    read_file_header,
    read_json_object,
    strict_json_loads,
)
from flora.errors import AdapterFormatError

ARCHIVE_META_KEY = "adapter_config"
_COPY_CHUNK = 1024 * 1024


def embedded_config_text(metadata: Mapping[str, Any], what: str = "adapter archive") -> str:
    """The config JSON text in an archive's ``__metadata__``.

    Raises:
        AdapterFormatError: there is none (a bare weights file).
    """
    text = metadata.get(ARCHIVE_META_KEY)
    if not isinstance(text, str):
        raise AdapterFormatError(
            f"{what}: __metadata__ has no {ARCHIVE_META_KEY!r} (is this a bare weights "
            "file? upload the directory's two files, or save with archive=True)"
        )
    return text


def embedded_config(header: Mapping[str, Any], what: str = "adapter archive") -> dict[str, Any]:
    """The config of an archive from its raw safetensors header (``__metadata__`` in it, as
    :func:`~flora.adapter.container.header_from_prefix` returns it), parsed as strict JSON.

    Raises:
        AdapterFormatError: no config, or one that is not a strict JSON object.
    """
    metadata = header.get("__metadata__")
    config = strict_json_loads(
        embedded_config_text(metadata if isinstance(metadata, Mapping) else {}, what),
        f"{what} {ARCHIVE_META_KEY}",
    )
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{what}: {ARCHIVE_META_KEY} is not a JSON object")
    return config


def read_embedded_config(
    path: str | os.PathLike[str],
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    what: str = "adapter archive",
) -> dict[str, Any]:
    """The config embedded in the archive at ``path``, reading only its header."""
    header, _ = read_file_header(path, max_header_bytes=max_header_bytes, what=what)
    return embedded_config(header, what)


def pack_single_file(
    config_path: str | os.PathLike[str],
    weights_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> str:
    """Write the single-file form of (config JSON file, weights safetensors) to ``out_path``
    and return the sha256 of what was written.

    The config is canonicalised (sorted keys, no spaces, ASCII) into the weights'
    ``__metadata__`` (its other values become strings), which goes first in the header; the
    header is written without spaces
    and padded with spaces to a multiple of 8 bytes, as safetensors does; the tensor bytes
    are copied unchanged (their offsets are relative to the data start). The config and the
    weights header are capped at ``max_header_bytes`` and must be strict JSON. Tensor entries
    are not checked here: ``load_adapter`` validates the result.

    Raises:
        HeaderTooLargeError, AdapterFormatError: naming ``config`` or ``weights``.
    """
    config = read_json_object(config_path, max_bytes=max_header_bytes, what="config")
    header, data_start = read_file_header(
        weights_path, max_header_bytes=max_header_bytes, what="weights"
    )
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise AdapterFormatError("weights: __metadata__ must be an object")
    meta = {str(k): str(v) for k, v in meta.items()}
    meta[ARCHIVE_META_KEY] = json.dumps(config, sort_keys=True, separators=(",", ":"))
    header = {"__metadata__": meta, **{k: v for k, v in header.items() if k != "__metadata__"}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    digest = hashlib.sha256()
    with Path(out_path).open("wb") as out, Path(weights_path).open("rb") as src:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            digest.update(chunk)
            out.write(chunk)
        src.seek(data_start)
        while chunk := src.read(_COPY_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()
