"""What a base model looks like to an adapter: its adaptable modules and a content hash.

Upload validation compares an adapter against ``describe_base`` and ``base_fingerprint``
without touching the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from flora.kinds import MODULE_KINDS, ModuleKind, ModuleSpec
from flora.layers import FloraLayer, module_spec

# ModuleKind and ModuleSpec live in flora.kinds; they stay importable from here.
__all__ = [
    "MODULE_KINDS",
    "ModuleKind",
    "ModuleSpec",
    "base_fingerprint",
    "base_state_items",
    "describe_base",
]


def describe_base(model: nn.Module) -> dict[str, ModuleSpec]:
    """Every module ``flora.inject`` could wrap, by qualified name.

    For an injected model the wrapped base layers are reported under the wrapper's name
    (the name the module had in the original model), and nothing inside a wrapper is
    listed separately.
    """
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
        h.update(data.data)  # the array's buffer (a memoryview), no copy
    return "sha256:" + h.hexdigest()
