"""Put an adapter into a model, and take it out again exactly."""

from __future__ import annotations

import copy

import torch
from torch import nn

from flora.adapter.adapter import Adapter
from flora.adapter.io import fingerprint_without_trained
from flora.adapter.validate import validate_against
from flora.errors import AdapterError, TensorShapeError, UnknownModuleError

# What apply_adapter changed, kept on the model so remove_adapter can undo it exactly.
_STATE_ATTR = "_flora_applied"


def apply_adapter(model: nn.Module, adapter: Adapter, *, check_fingerprint: bool = True) -> None:
    """Inject ``adapter.config`` into ``model`` and load the adapter's tensors.

    Validates first (``describe_base`` + fingerprint, see ``validate_against``), so a
    mismatched adapter leaves the model untouched. ``train_modules`` are replaced by
    copies holding the adapter's parameters (a head whose shape differs, e.g. another
    number of labels, gets parameters of the adapter's shape); the originals are kept
    for ``remove_adapter``. Tensors are cast to each layer's dtype and device.

    Raises:
        AdapterError: model already has an adapter, or a subclass from validation.
    """
    from flora.fingerprint import describe_base
    from flora.injection import adapter_layers, inject

    if any(True for _ in adapter_layers(model)) or hasattr(model, _STATE_ATTR):
        raise AdapterError("model already has an adapter; call remove_adapter first")
    fingerprint = None
    if check_fingerprint:
        fingerprint = fingerprint_without_trained(model, adapter.config.train_modules)
    validate_against(adapter, describe_base(model), fingerprint)
    full = {name: adapter.full_state(name) for name in adapter.full_modules()}
    replacements = {name: _trained_copy(model, name, state) for name, state in full.items()}

    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        inject(model, adapter.config)
    except ValueError as exc:
        raise AdapterError(f"cannot inject the adapter's config: {exc}") from exc
    originals: dict[str, nn.Module] = {}
    setattr(model, _STATE_ATTR, {"requires_grad": requires_grad, "originals": originals})
    try:
        with torch.no_grad():
            for name, layer in adapter_layers(model):
                layer.core.copy_(adapter.core(name))
                for u, value in zip(layer.factors, adapter.factors(name), strict=True):
                    u.copy_(value)
        for name, module in replacements.items():
            originals[name] = model.get_submodule(name)
            _set_submodule(model, name, module)
    except Exception:
        remove_adapter(model)
        raise


def remove_adapter(model: nn.Module) -> None:
    """Undo ``apply_adapter``: base layers and original trained modules back in place,
    ``requires_grad`` flags as they were. A no-op on a model without an adapter."""
    from flora.injection import eject

    eject(model)
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return
    for name, module in state["originals"].items():
        _set_submodule(model, name, module)
    for name, p in model.named_parameters():
        if name in state["requires_grad"]:
            p.requires_grad_(state["requires_grad"][name])


def _trained_copy(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of module ``name`` holding ``state``; parameters that change shape
    are replaced (and Linear/Embedding size attributes follow)."""
    try:
        original = model.get_submodule(name)
    except AttributeError as exc:
        raise UnknownModuleError(f"trained module {name!r} does not exist in the base") from exc
    module = copy.deepcopy(original)
    own = dict(module.named_parameters()) | dict(module.named_buffers())
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise UnknownModuleError(f"trained module {name!r} has no parameter {unknown[0]!r}")
    missing = sorted(set(own) - set(state))
    if missing:
        raise TensorShapeError(f"trained module {name!r}: parameter {missing[0]!r} is missing")
    with torch.no_grad():
        for key, value in state.items():
            target = own[key]
            value = value.to(device=target.device, dtype=target.dtype)
            if target.shape == value.shape:
                target.copy_(value)
                continue
            if target.dim() != value.dim():
                raise TensorShapeError(
                    f"tensor 'full.{name}.{key}' has shape {list(value.shape)}, the base has "
                    f"{list(target.shape)}"
                )
            owner_name, _, leaf = key.rpartition(".")
            owner = module.get_submodule(owner_name)
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(value.clone(), target.requires_grad)
            else:
                owner._buffers[leaf] = value.clone()
            _resize_attrs(owner, leaf, value.shape)
    return module


def _resize_attrs(owner: nn.Module, leaf: str, shape: torch.Size) -> None:
    # Keep the size attributes a few common modules read in forward/extra_repr honest.
    if leaf != "weight":
        return
    if isinstance(owner, nn.Linear):
        owner.out_features, owner.in_features = int(shape[0]), int(shape[1])
    elif isinstance(owner, nn.Embedding):
        owner.num_embeddings, owner.embedding_dim = int(shape[0]), int(shape[1])


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)
