"""Walk a model: swap adapter wrappers in, freeze the rest, merge and unmerge."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from flora.config import FloraConfig
from flora.layers import FloraLayer, wrapper_for

__all__ = [
    "adapter_layers",
    "eject",
    "get_config",
    "inject",
    "merge",
    "set_enabled",
    "unmerge",
]

# inject() records the config on the model under this attribute (read it with get_config).
CONFIG_ATTR = "flora_config"


def inject(model: nn.Module, config: FloraConfig) -> nn.Module:
    """Wrap every module ``config`` targets in place and freeze everything else.

    Trainable afterwards: the adapters' cores and factors, and every parameter of the
    ``train_modules``. Each wrapper takes its module's place (same qualified name) and
    keeps the module as ``.base_layer``. All checks run before anything changes:
    ValueError if nothing matches, if a matched module has an unsupported type, if
    ``train_modules`` is set but matches nothing, or if the model is already injected.
    Returns ``model``.
    """
    if any(True for _ in adapter_layers(model)):
        raise ValueError("model already has FLoRA adapters; eject() them first")
    plan: list[tuple[str, nn.Module, type[FloraLayer], tuple[int, ...]]] = []
    for name, module in model.named_modules():
        if not config.is_target(name):
            continue
        cls = wrapper_for(module)
        if cls is None:
            raise ValueError(
                f"module {name!r} matches target_modules but its type "
                f"{type(module).__name__} is not supported (Linear, Conv1d/2d/3d, "
                "Embedding without max_norm, transformers Conv1D)"
            )
        plan.append((name, module, cls, config.ranks_for(name, cls.spec_of(module))))
    if not plan:
        raise ValueError(f"no module matches target_modules={config.target_modules!r}")
    trained = [m for n, m in model.named_modules() if config.is_trained(n)]
    if config.train_modules and not trained:
        raise ValueError(f"no module matches train_modules={config.train_modules!r}")

    for p in model.parameters():
        p.requires_grad_(False)
    for name, module, cls, ranks in plan:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, cls(module, ranks, config.scale, config.dropout))
    for layer in (m for _, m in adapter_layers(model)):
        for p in layer.adapter_parameters():
            p.requires_grad_(True)
    for module in trained:
        for p in module.parameters():
            p.requires_grad_(True)
    # nn.Module.__setattr__ stores a non-tensor value as a plain attribute.
    setattr(model, CONFIG_ATTR, config)
    return model


def get_config(model: nn.Module) -> FloraConfig | None:
    """The ``FloraConfig`` that ``inject`` used on ``model`` (None if never injected)."""
    cfg = getattr(model, CONFIG_ATTR, None)
    return cfg if isinstance(cfg, FloraConfig) else None


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, FloraLayer]]:
    """``(qualified_name, layer)`` for every wrapper, named as in the original model."""
    for name, module in model.named_modules():
        if isinstance(module, FloraLayer):
            yield name, module


def merge(model: nn.Module) -> None:
    """Merge every adapter into its base weight; all or nothing.

    If one layer refuses (``NonFiniteError``), the layers merged by this call are
    unmerged again before the error propagates. ValueError, before anything changes, if
    a wrapped weight is tied to another module (e.g. ``lm_head`` sharing the embedding):
    merging would silently change that module too.
    """
    _refuse_tied(model)
    done: list[FloraLayer] = []
    try:
        for _, layer in adapter_layers(model):
            if not layer.merged:
                layer.merge()
                done.append(layer)
    except Exception:
        for layer in done:
            layer.unmerge()
        raise


def _refuse_tied(model: nn.Module) -> None:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for name, layer in adapter_layers(model):
        users = names.get(id(layer.base_weight), [])
        if len(users) > 1:
            raise ValueError(
                f"cannot merge {name!r}: its weight is tied to {', '.join(sorted(users))}"
            )


def unmerge(model: nn.Module) -> None:
    """Restore every merged base weight bitwise."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter branch on or off (off: forward is the base model)."""
    for _, layer in adapter_layers(model):
        layer.enabled = enabled


def eject(model: nn.Module) -> nn.Module:
    """Undo ``inject``: unmerge, put every base layer back at its name, drop the config.

    ``requires_grad`` flags set by ``inject`` are left as they are. Returns ``model``.
    """
    for name, layer in list(adapter_layers(model)):
        layer.unmerge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    if CONFIG_ATTR in model.__dict__:
        delattr(model, CONFIG_ATTR)
    return model
