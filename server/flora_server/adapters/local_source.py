"""Adapters read from the server's own filesystem (vLLM's `lora_path`, LoRAX's
`adapter_source="local"`), confined to the configured `lora_dirs`.

A path is resolved (symlinks and `..` followed) before it is compared with the allowed
directories, also resolved, so neither a `..` nor a symlink inside an allowed directory
can reach a file outside it. The files are then staged like an upload: a PEFT LoRA
directory is converted (`peft_upload`), a FLoRA directory or single file is taken as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flora_server.adapters.peft_upload import PEFT_CONFIG, PEFT_WEIGHTS, peft_type, peft_upload
from flora_server.adapters.registry import (
    AdapterRegistry,
    AdapterValidationError,
    PutResult,
    StagedUpload,
)
from flora_server.adapters.store import sha256_file

FLORA_CONFIG = "adapter_config.json"
FLORA_WEIGHTS = "adapter.safetensors"


class LocalPathError(Exception):
    """The path is not usable: outside the allowed directories, missing, or none allowed.
    `missing` tells a path that does not exist (404) from one that is refused (400)."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


def confined_path(path: str, allowed: Sequence[str | Path]) -> Path:
    """The resolved `path` when it lies inside one of `allowed`, absolute directories
    (relative paths are taken relative to the first allowed directory); LocalPathError
    otherwise."""
    if not allowed:
        raise LocalPathError("local adapter paths are disabled: the server has no --lora-dirs")
    if not path or "\x00" in path:
        raise LocalPathError("the path is empty or holds a NUL byte")
    # Path("") and any relative root resolve against the working directory, which no entry
    # of --lora-dirs means (Settings refuses them; this holds for any other caller too).
    if any(not str(root).strip() or not Path(root).expanduser().is_absolute() for root in allowed):
        raise LocalPathError("an allowed directory (--lora-dirs) is empty or relative; refused")
    roots = [Path(root).expanduser().resolve() for root in allowed]
    try:
        candidate = Path(path).expanduser()
    except RuntimeError:  # "~user" of no such user, or no home directory to expand "~"
        raise LocalPathError(f"{path!r} names a home directory that does not exist") from None
    if not candidate.is_absolute():
        candidate = roots[0] / candidate
    try:
        real = candidate.resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        inside = any(candidate.resolve().is_relative_to(r) for r in roots)
        raise LocalPathError(
            f"{path!r} does not exist"
            if inside
            else f"{path!r} is outside the allowed directories (--lora-dirs)",
            missing=inside,
        ) from None
    except (OSError, RuntimeError) as exc:  # a symlink loop, permissions
        raise LocalPathError(f"{path!r} cannot be resolved: {exc}") from None
    if not any(real.is_relative_to(root) for root in roots):
        raise LocalPathError(f"{path!r} is outside the allowed directories (--lora-dirs)")
    return real


def stage_local(real: Path, staging: Path) -> StagedUpload:
    """The upload for an adapter at a confined path (blocking: may convert PEFT into
    `staging`). Raises AdapterValidationError when no adapter is found there."""
    for inner in (real / PEFT_CONFIG, real / PEFT_WEIGHTS, real / FLORA_WEIGHTS):
        if inner.is_symlink():  # could point outside the allowed directories
            raise LocalPathError(f"{inner.name} in {real.name} is a symlink; refused")
    if real.is_file():
        return StagedUpload(archive=real, archive_sha256=sha256_file(real))
    config = real / PEFT_CONFIG
    if config.is_file() and (real / PEFT_WEIGHTS).is_file() and peft_type(config) is not None:
        return peft_upload(config, real / PEFT_WEIGHTS, staging)
    if config.is_file() and (real / FLORA_WEIGHTS).is_file():
        weights = real / FLORA_WEIGHTS
        return StagedUpload(config=config, weights=weights, weights_sha256=sha256_file(weights))
    raise AdapterValidationError(
        f"{real.name}: expected a PEFT LoRA ({PEFT_CONFIG} + {PEFT_WEIGHTS}), a FLoRA adapter "
        f"({FLORA_CONFIG} + {FLORA_WEIGHTS}) or a single .flora file"
    )


def register_local(
    registry: AdapterRegistry, adapter_id: str, real: Path, *, overwrite: bool
) -> PutResult:
    """Validate and store the adapter at confined path `real` under `adapter_id`
    (blocking). Raises what `AdapterRegistry.put` raises, and AdapterValidationError."""
    with registry.staging_file("local") as staging:
        return registry.put(adapter_id, stage_local(real, staging), overwrite=overwrite)
