"""What a base model looks like to an adapter: its adaptable modules and a content hash.

Upload validation compares an adapter against ``describe_base`` and ``base_fingerprint``
without touching the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn

__all__ = ["ModuleKind", "ModuleSpec", "base_fingerprint", "base_state_items", "describe_base"]

ModuleKind = Literal["linear", "conv1d", "conv2d", "conv3d", "embedding", "hf_conv1d"]
MODULE_KINDS: tuple[str, ...] = get_args(ModuleKind)


@dataclass(frozen=True)
class ModuleSpec:
    """One adaptable module of a base.

    ``weight_shape`` is the base weight's own layout, which is also the mode order of the
    adapter: Linear ``(out, in)``; ConvNd ``(out, in/groups, k_1..k_m)``; Embedding
    ``(num, dim)``; transformers ``Conv1D`` ``(in, out)``.
    """

    kind: ModuleKind
    weight_shape: tuple[int, ...]
    groups: int = 1

    def __post_init__(self) -> None:
        if self.kind not in MODULE_KINDS:
            raise ValueError(f"unknown module kind {self.kind!r}; expected one of {MODULE_KINDS}")
        shape = tuple(self.weight_shape)
        if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(f"weight_shape must be positive integers, got {self.weight_shape!r}")
        expected = {"conv1d": 3, "conv2d": 4, "conv3d": 5}.get(self.kind, 2)
        if len(shape) != expected:
            raise ValueError(f"{self.kind} weight needs {expected} modes, got shape {shape}")
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"groups must be an integer >= 1, got {self.groups!r}")
        if self.groups != 1 and not self.kind.startswith("conv"):
            raise ValueError(f"groups={self.groups} only makes sense for convs, not {self.kind}")
        object.__setattr__(self, "weight_shape", shape)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"kind", "weight_shape": [..], "groups"}``."""
        return {"kind": self.kind, "weight_shape": list(self.weight_shape), "groups": self.groups}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModuleSpec:
        """Inverse of ``to_dict``; ValueError on missing/unknown keys or bad values.

        Extra keys used by the adapter format next to a spec (``ranks``) are ignored.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"ModuleSpec needs a mapping, got {type(d).__name__}")
        missing = {"kind", "weight_shape"} - set(d)
        if missing:
            raise ValueError(f"ModuleSpec is missing {', '.join(sorted(missing))}")
        shape = d["weight_shape"]
        if not isinstance(shape, list | tuple):
            raise ValueError(f"weight_shape must be a list, got {shape!r}")
        return cls(kind=d["kind"], weight_shape=tuple(shape), groups=d.get("groups", 1))


def describe_base(model: nn.Module) -> dict[str, ModuleSpec]:
    """Every module ``flora.inject`` could wrap, by qualified name.

    For an injected model the wrapped base layers are reported under the wrapper's name
    (the name the module had in the original model), and nothing inside a wrapper is
    listed separately.
    """
    from flora.layers import FloraLayer, module_spec

    out: dict[str, ModuleSpec] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, FloraLayer):
            inside.append(name + ".")
            out[name] = module.spec
            continue
        spec = module_spec(module)
        if spec is not None:
            out[name] = spec
    return out


def base_state_items(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """The base's state-dict entries of a possibly injected model, under base names.

    Adapter tensors are dropped, ``<layer>.base_layer.<p>`` becomes ``<layer>.<p>``, and
    a merged layer reports its saved original weight, so the result is the state dict
    of the model as it was before ``inject``.
    """
    from flora.layers import FloraLayer

    layers = {n + ".": m for n, m in model.named_modules() if isinstance(m, FloraLayer)}
    for key, value in model.state_dict().items():
        prefix = next((p for p in layers if key.startswith(p)), None)
        if prefix is None:
            yield key, value
            continue
        rest = key[len(prefix) :]
        if not rest.startswith("base_layer."):
            continue  # the adapter's own tensors
        rest = rest[len("base_layer.") :]
        layer = layers[prefix]
        if rest == "weight" and layer.merged:
            yield prefix + rest, layer.original_weight()
        else:
            yield prefix + rest, value


def base_fingerprint(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """``"sha256:" + hex`` over the base's tensors, sorted by name.

    For each tensor: its name, shape, dtype string and raw bytes (contiguous, on the
    CPU), each field length-prefixed so no two different states hash alike by shifting
    bytes between fields. A module is hashed through its ``state_dict()`` (persistent
    buffers included, non-persistent ones not), so the fingerprint of a model equals
    that of its state dict; an injected (or merged) model hashes as its base.
    """
    if isinstance(model_or_state_dict, nn.Module):
        items = dict(base_state_items(model_or_state_dict))
    else:
        items = dict(model_or_state_dict)
    h = hashlib.sha256()
    for name in sorted(items):
        t = items[name].detach()
        for field in (name, str(tuple(t.shape)), str(t.dtype)):
            raw = field.encode()
            h.update(len(raw).to_bytes(8, "little") + raw)
        data = t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(data.nbytes.to_bytes(8, "little"))
        h.update(data)
    return "sha256:" + h.hexdigest()
