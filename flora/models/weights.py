"""The canonical fp32 weights of a loaded base, read back from its safetensors files.

``LoadedModel.source_path`` holds the weights as saved, which is not always the model's
state dict key for key: Hugging Face drops tied copies (SmolLM2's ``lm_head.weight`` is
``model.embed_tokens.weight``), and a user directory may carry stale extra tensors.
:func:`canonical_state_dict` reconciles the two, so that

    base_fingerprint(canonical_state_dict(loaded)) == loaded.fingerprint

holds for every model loaded by :func:`flora.models.load`, whatever its runtime dtype and
whether adapters were injected since (names are the base's, from
``flora.fingerprint.base_state_items``). Ties are found by storage sharing in the live
model, so call it before merging an adapter into a tied weight (the server does it once at
start-up and caches the result per ``train_modules``).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from flora.models.errors import ModelError
from flora.models.types import LoadedModel


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a ``.safetensors`` file or of a sharded ``*.safetensors.index.json``."""
    from safetensors.torch import load_file

    if path.name.endswith(".index.json"):
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = (path.parent / shard).resolve()
            if shard_path.parent != path.parent.resolve():
                raise ModelError(f"shard {shard!r} lies outside {path.parent}")
            state.update(load_file(str(shard_path)))
        return state
    return load_file(str(path))


def _alias_groups(live: dict[str, Tensor]) -> list[list[str]]:
    """Keys whose tensors share storage (tied weights), in groups of two or more."""
    by_storage: dict[tuple[int, int, tuple[int, ...]], list[str]] = {}
    for key, value in live.items():
        if value.numel() == 0:
            continue
        ident = (
            value.untyped_storage().data_ptr(),
            int(value.storage_offset()),
            tuple(value.shape),
        )
        by_storage.setdefault(ident, []).append(key)
    return [keys for keys in by_storage.values() if len(keys) > 1]


def canonical_state_dict(loaded: LoadedModel) -> dict[str, Tensor]:
    """The base's state dict as stored: fp32 (as written), CPU, keys of the live base.

    Tied aliases missing from the file are filled from their stored twin; stored tensors
    the model does not have are dropped. A key the model has but no stored tensor (nor
    twin) provides raises ``ModelError``.
    """
    from flora.fingerprint import base_state_items

    if loaded.source_path is None:
        raise ModelError(f"{loaded.name} has no source weights file")
    stored = read_safetensors(loaded.source_path)
    live = dict(base_state_items(loaded.model))
    twin: dict[str, str] = {}
    for group in _alias_groups(live):
        present = [k for k in group if k in stored]
        for key in group:
            if key not in stored and present:
                twin[key] = present[0]
    out: dict[str, Tensor] = {}
    for key, value in live.items():
        source = key if key in stored else twin.get(key)
        if source is None:
            raise ModelError(f"{loaded.source_path} has no tensor for {key!r}")
        tensor = stored[source]
        if tuple(tensor.shape) != tuple(value.shape):
            raise ModelError(f"{key!r}: stored shape {tuple(tensor.shape)} != {tuple(value.shape)}")
        out[key] = tensor
    return out
