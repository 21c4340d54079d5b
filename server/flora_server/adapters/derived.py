"""Adapters derived per request and cached in the store under ids keyed by their inputs:
LoRAX's `merged_adapters` (a merge of stored adapters, `flora.merging`) and
`adapter_source="local"` (a path inside `--lora-dirs`).

The derived id is a digest of everything that decides the result (the inputs' sha256s, the
weights and the merge parameters; or the local files' sha256s), so the same request reuses
the stored result, a changed input makes a new one, and an overwrite can never serve a stale
merge. Derived ids start with `merge-` / `local-` (after the caller's `TENANT.` prefix) and
are listed with the other adapters; deleting one only drops the cache entry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from flora_server.adapters.local_source import FLORA_WEIGHTS, stage_local
from flora_server.adapters.peft_upload import PEFT_CONFIG, PEFT_WEIGHTS
from flora_server.adapters.registry import AdapterRegistry, StagedUpload
from flora_server.adapters.store import sha256_file

if TYPE_CHECKING:
    from flora.merging import MergeStrategy, SignMethod

_SOURCE_FILES = (PEFT_CONFIG, PEFT_WEIGHTS, FLORA_WEIGHTS)  # what stage_local reads

# Per-row serving holds at most this rank per linear module (flora.serving's default).
SERVING_MAX_RANK = 64


class InputChangedError(Exception):
    """An input adapter was replaced while the merge was computed."""


def _digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def merged_id(
    registry: AdapterRegistry,
    ids: list[str],
    weights: list[float],
    strategy: str,
    density: float,
    majority_sign_method: str,
    prefix: str = "",
) -> tuple[str, list[str]]:
    """The derived id for a merge and the inputs' sha256s it is keyed by (blocking;
    StoredAdapterMissingError for an unknown input)."""
    shas = [registry.stat(i).sha256 for i in ids]
    key = _digest(
        {
            "inputs": shas,
            "weights": [float(w) for w in weights],
            "strategy": strategy,
            # DARE/TIES parameters only matter for those strategies: a linear merge is one
            # entry whatever density a client sends.
            "density": density if strategy != "linear" else None,
            "sign": majority_sign_method if strategy in ("ties", "dare_ties") else None,
        }
    )
    return f"{prefix}merge-{key[:40]}", shas


def build_merge(
    registry: AdapterRegistry,
    adapter_id: str,
    ids: list[str],
    shas: list[str],
    weights: list[float],
    strategy: MergeStrategy,
    density: float,
    majority_sign_method: SignMethod,
) -> None:
    """Load the inputs, merge them and store the result under `adapter_id` through the
    validator (blocking). Raises flora's AdapterError for a merge that cannot be made,
    the registry's errors for one the base refuses, InputChangedError on a race."""
    from flora.adapter import encode_adapter
    from flora.merging import merge_adapters

    loaded = [registry.load(i) for i in ids]
    # The bytes merged are the ones the key names: the digest comes with each load.
    if [one.sha256 for one in loaded] != shas:
        raise InputChangedError("an input adapter was replaced during the merge; retry")
    merged = merge_adapters(
        [one.adapter for one in loaded],
        weights,
        strategy=strategy,
        density=density,
        majority_sign_method=majority_sign_method,
        seed=int(adapter_id.rsplit("-", 1)[1][:8], 16),
        max_rank=SERVING_MAX_RANK,
    )
    data, _ = encode_adapter(merged, archive=True)
    with registry.staging_file("merge") as path:
        path.write_bytes(data)
        upload = StagedUpload(archive=path, archive_sha256=hashlib.sha256(data).hexdigest())
        registry.put(adapter_id, upload, overwrite=True)


def register_local_derived(registry: AdapterRegistry, real: Path, prefix: str = "") -> str:
    """Store the adapter at confined path `real` under an id keyed by its source files'
    sha256s and return that id (blocking)."""
    sources = (
        [real]
        if real.is_file()
        else sorted(p for p in real.iterdir() if p.is_file() and not p.is_symlink())
    )
    key = _digest(
        [[p.name, sha256_file(p)] for p in sources if p.name in _SOURCE_FILES or p == real]
    )
    adapter_id = f"{prefix}local-{key[:40]}"
    if not registry.exists(adapter_id):
        with registry.staging_file("local") as staging:
            registry.put(adapter_id, stage_local(real, staging), overwrite=True)
    return adapter_id
