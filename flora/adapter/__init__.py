"""Adapter format v1: save, load, validate, apply (see docs/flora.md and
docs/architecture.md, section "Adapter format v1")."""

from flora.adapter.adapter import Adapter, adapter_sha256, core_key, factor_key
from flora.adapter.apply import apply_adapter, remove_adapter
from flora.adapter.archive import pack_single_file, read_embedded_config
from flora.adapter.container import ALLOWED_DTYPES, DEFAULT_MAX_HEADER_BYTES
from flora.adapter.io import (
    ARCHIVE_SUFFIX,
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_from_model,
    encode_adapter,
    load_adapter,
    load_adapter_bytes,
    load_archive_bytes,
    save_adapter,
)
from flora.adapter.schema import DEFAULT_MAX_RANK, FORMAT_VERSION, AdapterModule
from flora.adapter.validate import validate_against

__all__ = [
    "ALLOWED_DTYPES",
    "ARCHIVE_SUFFIX",
    "CONFIG_NAME",
    "DEFAULT_MAX_HEADER_BYTES",
    "DEFAULT_MAX_RANK",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "Adapter",
    "AdapterModule",
    "adapter_from_model",
    "adapter_sha256",
    "apply_adapter",
    "core_key",
    "encode_adapter",
    "factor_key",
    "load_adapter",
    "load_adapter_bytes",
    "load_archive_bytes",
    "pack_single_file",
    "read_embedded_config",
    "remove_adapter",
    "save_adapter",
    "validate_against",
]
