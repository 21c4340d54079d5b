"""PEFT LoRA as the server receives it: `adapter_config.json` (with `peft_type`) and
`adapter_model.safetensors`, exactly as PEFT's `save_pretrained` writes them.

The pair is converted with `flora.interop.from_peft` (exact: `G = scaling * I_r`,
`U_out = B`, `U_in = A^T`, so `dW = scaling * B @ A` bit for bit in float32) into the
single-file FLoRA form, which then goes through the same validator and store as any upload.
PEFT files carry no base fingerprint: the module table (names, kinds, shapes) is what ties
them to the base, and the stored adapter's fingerprint is null.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from flora.adapter.container import read_file_header, read_json_object
from flora_server.adapters.registry import (
    AdapterValidationError,
    StagedUpload,
    UploadDigestError,
    library_errors,
)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def peft_type(config_path: Path) -> str | None:
    """The config's `peft_type` (None: not a PEFT config, e.g. a FLoRA one)."""
    value = _read_config(config_path).get("peft_type")
    return None if value is None else str(value)


def _read_config(config_path: Path) -> dict[str, Any]:
    """The config as strict JSON, under the library's cap (any two-file upload's config
    passes here: a FLoRA one is told apart by having no `peft_type`)."""
    with library_errors():
        return read_json_object(config_path, what="config")


def convert_peft(config_path: Path, weights_path: Path, out_path: Path) -> str:
    """Convert a PEFT LoRA pair into the single-file FLoRA form at `out_path`; returns its
    sha256. Raises AdapterValidationError for what has no exact FLoRA equivalent
    (`flora.interop.PEFT_OPTIONS_WITHOUT_EQUIVALENT`: DoRA, aLoRA, QALoRA, ...; bias or
    modules_to_save training, conv LoRA, another peft_type) or a malformed file."""
    from flora.adapter import encode_adapter
    from flora.errors import AdapterError
    from flora.interop import from_peft, refuse_peft_options

    config = _read_config(config_path)
    kind = config.get("peft_type")
    if kind != "LORA":
        raise AdapterValidationError(
            f"PEFT peft_type {kind!r} is not accepted: only LORA converts exactly to FLoRA"
        )
    try:  # the library's list (DoRA, aLoRA, ...), before the weights are read
        refuse_peft_options(config)
    except AdapterError as exc:
        raise AdapterValidationError(str(exc)) from None
    with library_errors():
        header, _ = read_file_header(weights_path, what="weights")
    saved_base = sorted(k for k in header if k.endswith(".base_layer.weight"))
    if saved_base:
        # from_peft without the base would drop these copies unchecked; the live base may
        # have an adapter merged in, so they are refused rather than compared.
        raise AdapterValidationError(
            f"PEFT weights hold a base-layer copy ({saved_base[0]!r}, saved for a targeted "
            "or resized embedding); save with save_embedding_layers=False"
        )
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".peft-") as tmp:
        root = Path(tmp)
        os.symlink(config_path.resolve(), root / PEFT_CONFIG)
        os.symlink(weights_path.resolve(), root / PEFT_WEIGHTS)
        try:
            adapter = from_peft(root)
        except (AdapterError, ValueError) as exc:
            raise AdapterValidationError(f"PEFT LoRA: {exc}") from None
    weights, _ = encode_adapter(adapter, archive=True)
    out_path.write_bytes(weights)
    return hashlib.sha256(weights).hexdigest()


def peft_upload(config_path: Path, weights_path: Path, out_path: Path) -> StagedUpload:
    """The staged single-file upload converted from a PEFT pair."""
    digest = convert_peft(config_path, weights_path, out_path)
    return StagedUpload(archive=out_path, archive_sha256=digest)


def as_flora_upload(
    upload: StagedUpload, expected_sha256: str | None, staging: Path
) -> tuple[StagedUpload, str | None]:
    """A two-file upload whose config names a `peft_type` is converted into `staging` (the
    client's `sha256` is checked against the PEFT weights it sent, as for any two-file
    upload); anything else is returned unchanged. Blocking (reads and converts files)."""
    if upload.config is None or upload.weights is None or peft_type(upload.config) is None:
        return upload, expected_sha256
    if expected_sha256 is not None and expected_sha256.lower() != upload.weights_sha256:
        raise UploadDigestError(
            f"sha256 mismatch: the field says {expected_sha256}, "
            f"the bytes hash to {upload.weights_sha256}"
        )
    return peft_upload(upload.config, upload.weights, staging), None
