"""The canonical fp32 weights of a loaded base, read back from its safetensors files.

``LoadedModel.source_path`` holds the weights as saved, which is not always the model's
state dict key for key: Hugging Face drops tied copies (SmolLM2's ``lm_head.weight`` is
``model.embed_tokens.weight``), and a user directory may carry stale extra tensors.
:func:`canonical_state_dict` reconciles the two, so that

    base_fingerprint(canonical_state_dict(loaded)) == loaded.fingerprint

holds for every model loaded by :func:`flora.models.load`, whatever its runtime dtype and
whether ``flora.inject`` wrapped its layers since (names are the base's, from
``flora.fingerprint.base_state_items``). Ties are found by storage sharing in the live
model. A serving runtime's wrappers (``flora.serving``: ``<module>.base_layer.weight``) and
merged adapters are not undone, so a server takes the :class:`StoredLayout` once at
start-up, from the pristine base, and reads the file through it whenever it needs the
weights: :meth:`StoredLayout.read` never looks at the live model again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class StoredLayout:
    """Where each entry of a base's canonical state dict lies in its weights file.

    ``sources`` maps each base state-dict key to the stored tensor that holds it (itself, or
    its tied twin's); ``shapes`` is each key's shape in the model.
    """

    path: Path
    sources: Mapping[str, str]
    shapes: Mapping[str, tuple[int, ...]]

    def read(self) -> dict[str, Tensor]:
        """The canonical state dict: fp32 (as written), CPU, keyed like the base.

        Raises ``ModelError`` when the file can no longer be read, no longer holds a tensor
        of the layout, or holds it in another shape (it changed since the layout was taken).
        """
        try:
            stored = read_safetensors(self.path)
        except OSError as exc:
            raise ModelError(f"cannot read the base weights {self.path}: {exc}") from exc
        out: dict[str, Tensor] = {}
        for key, source in self.sources.items():
            tensor = stored.get(source)
            if tensor is None:
                raise ModelError(f"{self.path} has no tensor {source!r} (for {key!r})")
            if tuple(tensor.shape) != self.shapes[key]:
                raise ModelError(
                    f"{key!r}: stored shape {tuple(tensor.shape)} != {self.shapes[key]}"
                )
            out[key] = tensor
        return out


def stored_tensor_names(path: Path) -> set[str]:
    """The tensor names of a ``.safetensors`` file or sharded index, from headers only."""
    from safetensors import safe_open

    if path.name.endswith(".index.json"):
        return set(json.loads(path.read_text(encoding="utf-8"))["weight_map"])
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def stored_layout(loaded: LoadedModel) -> StoredLayout:
    """The :class:`StoredLayout` of ``loaded``'s weights file, keyed like its base.

    Tied aliases missing from the file are read from their stored twin; stored tensors the
    model does not have are left out. Take it while no serving runtime has wrapped the
    model's modules (``flora.inject``'s layers are seen through).

    Raises:
        ModelError: no weights file, or a key the model has that no stored tensor (nor
        twin) provides.
    """
    from flora.fingerprint import base_state_items

    if loaded.source_path is None:
        raise ModelError(f"{loaded.name} has no source weights file")
    stored = stored_tensor_names(loaded.source_path)
    live = dict(base_state_items(loaded.model))
    twin: dict[str, str] = {}
    for group in _alias_groups(live):
        present = [k for k in group if k in stored]
        for key in group:
            if key not in stored and present:
                twin[key] = present[0]
    sources: dict[str, str] = {}
    for key in live:
        source = key if key in stored else twin.get(key)
        if source is None:
            raise ModelError(f"{loaded.source_path} has no tensor for {key!r}")
        sources[key] = source
    shapes = {k: tuple(v.shape) for k, v in live.items()}
    return StoredLayout(loaded.source_path, sources, shapes)


def canonical_state_dict(loaded: LoadedModel) -> dict[str, Tensor]:
    """The base's state dict as stored: fp32 (as written), CPU, keys of the live base
    (``stored_layout(loaded).read()``; see there for what it raises)."""
    return stored_layout(loaded).read()
