"""Checks that tie the tensors to the config, and the adapter to a base."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from flora.adapter.adapter import Adapter, core_key, factor_key, split_full_key
from flora.adapter.schema import AdapterHeader
from flora.errors import (
    AdapterConfigError,
    BaseMismatchError,
    MissingTensorError,
    NonFiniteError,
    TensorShapeError,
    UnknownModuleError,
    UnknownTensorError,
)
from flora.kinds import ModuleSpec


def expected_shapes(header: AdapterHeader) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every ``flora.*`` tensor the config announces.

    Core of a module with ranks ``(r_1..r_N)``: ``(r_1..r_N)``; factor m: ``(d_m, r_m)``
    with ``d_m`` the base weight's size along mode m.
    """
    out: dict[str, tuple[int, ...]] = {}
    for name, module in header.modules.items():
        out[core_key(name)] = module.ranks
        for m, (d, r) in enumerate(zip(module.spec.weight_shape, module.ranks, strict=True)):
            out[factor_key(name, m)] = (d, r)
    return out


def check_modules_follow_config(header: AdapterHeader) -> None:
    """Every module is a target of the config and has the ranks the config gives it.

    ``apply_adapter`` injects with the config, so a table the config would not reproduce
    could never be applied; refuse it at load time instead.
    """
    config = header.config
    for name, module in header.modules.items():
        if not config.is_target(name):
            raise AdapterConfigError(f"module {name!r} is not selected by config.target_modules")
        try:
            ranks = config.ranks_for(name, module.spec)
        except ValueError as exc:
            raise AdapterConfigError(f"module {name!r}: {exc}") from exc
        if tuple(ranks) != module.ranks:
            raise AdapterConfigError(
                f"module {name!r}: ranks {list(module.ranks)} differ from the config's "
                f"{list(ranks)}"
            )


def check_tensor_table(header: AdapterHeader, shapes: Mapping[str, Any]) -> None:
    """Compare the tensor names/shapes of a file with what the config announces.

    ``shapes`` maps key -> shape (a header entry's ``shape`` or a tensor's ``.shape``).

    Raises:
        UnknownTensorError, MissingTensorError, TensorShapeError: naming the tensor.
    """
    expected = expected_shapes(header)
    for key in sorted(shapes):
        if key in expected:
            if tuple(shapes[key]) != expected[key]:
                raise TensorShapeError(
                    f"tensor {key!r} has shape {list(shapes[key])}, expected {list(expected[key])}"
                )
        elif split_full_key(key, header.config.train_modules) is None:
            raise UnknownTensorError(
                f"tensor {key!r} is neither a module's core/factor nor a train_modules parameter"
            )
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise MissingTensorError(f"tensor {missing[0]!r} is missing ({len(missing)} missing)")


def check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise ``NonFiniteError`` naming the first tensor holding NaN or +-Inf."""
    for key in sorted(tensors):
        if not bool(torch.isfinite(tensors[key]).all()):
            raise NonFiniteError(f"tensor {key!r} holds NaN or Inf values")


def validate_against(
    adapter: Adapter, base_specs: Mapping[str, ModuleSpec], fingerprint: str | None = None
) -> None:
    """Check an adapter against a base described by ``describe_base`` (no model needed).

    - ``fingerprint`` (the base's ``base_fingerprint``) must equal the adapter's, when
      both are known (an adapter imported from PEFT may not carry one);
    - every adapted module must exist in the base with the same kind, weight shape and
      groups;
    - the config must select no base module the adapter lacks (injecting it would
      leave an adapter layer with nothing to load).

    Raises:
        BaseMismatchError: fingerprints differ, or the config selects extra modules.
        UnknownModuleError: a module is missing from the base or of another kind/shape.
    """
    known = fingerprint is not None and adapter.fingerprint is not None
    if known and fingerprint != adapter.fingerprint:
        raise BaseMismatchError(
            f"adapter was made for base {adapter.base_model_id!r} with fingerprint "
            f"{adapter.fingerprint}, this base is {fingerprint}"
        )
    for name, module in sorted(adapter.modules.items()):
        spec = base_specs.get(name)
        if spec is None:
            raise UnknownModuleError(f"module {name!r} does not exist in the base")
        if spec != module.spec:
            raise UnknownModuleError(
                f"module {name!r} is {spec.kind} {list(spec.weight_shape)} groups={spec.groups} "
                f"in the base, the adapter expects {module.spec.kind} "
                f"{list(module.spec.weight_shape)} groups={module.spec.groups}"
            )
    extra = sorted(
        n for n in base_specs if adapter.config.is_target(n) and n not in adapter.modules
    )
    if extra:
        raise BaseMismatchError(
            f"the adapter's target_modules select base module {extra[0]!r} "
            f"({len(extra)} in all) that the adapter has no tensors for"
        )
