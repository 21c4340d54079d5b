"""Upload validation against the loaded base: `flora.load_adapter`, the base's module
table and fingerprint, whole-saved modules that must fit, and what the engine can serve."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flora_server.adapters.registry import AdapterValidationError

if TYPE_CHECKING:
    from flora.adapter import Adapter


@dataclass(frozen=True)
class BaseSnapshot:
    """The base as uploads are checked against, taken before the engine runs (an engine may
    merge an adapter into the weights or swap a head later)."""

    loaded: Any  # flora.models.LoadedModel
    specs: dict[str, Any]  # describe_base: module name -> ModuleSpec
    fingerprint: str
    shapes: dict[str, tuple[int, ...]]  # state-dict key -> shape
    linear: frozenset[str]  # names of nn.Linear modules

    @classmethod
    def of(cls, loaded: Any) -> BaseSnapshot:
        from torch import nn

        from flora.fingerprint import describe_base

        return cls(
            loaded=loaded,
            specs=describe_base(loaded.model),
            fingerprint=loaded.fingerprint,
            shapes={k: tuple(v.shape) for k, v in loaded.model.state_dict().items()},
            linear=frozenset(
                n for n, m in loaded.model.named_modules() if isinstance(m, nn.Linear)
            ),
        )


class BaseValidator:
    """Reads an adapter file with `flora.load_adapter` and checks it against the base's module
    table and fingerprint, then asks the engine whether it can serve it (`engine_check`,
    ValueError when not). flora errors and ValueErrors become `AdapterValidationError`."""

    def __init__(self, base: BaseSnapshot, engine_check: Callable[[Adapter], None]) -> None:
        self.base = base
        self.base_name = str(getattr(base.loaded, "name", "") or "this base")
        self.engine_check = engine_check
        self._partial: dict[tuple[str, ...], str] = {}

    def _fingerprint_for(self, train_modules: list[str] | str) -> str:
        # An adapter that retrains whole modules carries the fingerprint of the base minus
        # those modules; compute it from the pristine weights file (never from the live
        # model, whose weights may have an adapter merged in).
        if not train_modules:
            return self.base.fingerprint
        key = (train_modules,) if isinstance(train_modules, str) else tuple(train_modules)
        if key not in self._partial:
            from flora.adapter.io import trained_module_names
            from flora.fingerprint import base_fingerprint
            from flora.models import canonical_state_dict

            names = trained_module_names(self.base.loaded.model, train_modules)
            prefixes = tuple(n + "." for n in names)
            # keyed like the live model, tied copies (lm_head) filled in, as training hashes it
            state = canonical_state_dict(self.base.loaded)
            self._partial[key] = base_fingerprint(
                {k: v for k, v in state.items() if not k.startswith(prefixes)}
            )
        return self._partial[key]

    def foreign_base(self, config: dict[str, Any]) -> str | None:
        """For a stored adapter's config JSON (`adapter_config` in its header): None when
        it was trained for this base (its fingerprint is this base's, less the modules it
        retrains whole), else the base it names (`base_model.id`, or its fingerprint). An
        adapter without a fingerprint (imported) is this base's if it validates."""
        base = config.get("base_model")
        base = base if isinstance(base, dict) else {}
        fingerprint = base.get("fingerprint")
        if not isinstance(fingerprint, str):
            return None
        settings = config.get("config")
        train_modules = settings.get("train_modules") if isinstance(settings, dict) else None
        try:
            mine = self._fingerprint_for(train_modules or [])
        except Exception:  # patterns this base cannot resolve: not an adapter of it
            mine = None
        if fingerprint == mine:
            return None
        return str(base.get("id") or fingerprint)

    def __call__(self, path: Path) -> Adapter:
        from flora.adapter import load_adapter, validate_against
        from flora.errors import AdapterError

        try:
            adapter = load_adapter(path)
            # Whole-saved modules first: the fingerprint leaves them out, and the message
            # names the module and shapes.
            self.check_full_shapes(adapter)
            self.engine_check(adapter)
            validate_against(
                adapter, self.base.specs, self._fingerprint_for(adapter.config.train_modules)
            )
        except (AdapterError, ValueError) as exc:
            raise AdapterValidationError(str(exc)) from exc
        return adapter

    def check_full_shapes(self, adapter: Adapter) -> None:
        """Modules saved whole (`full.<module>.<param>`) must fit the base module they
        replace: the same parameters and shapes, except that a Linear may change its number
        of outputs (a new head with other classes: weight [C', F] with the base's F, bias
        [C']). A module the base lacks is left to the engine's check. Raises ValueError.
        The fingerprint leaves these modules out, so nothing else catches a misfit."""
        for module in adapter.full_modules():
            prefix = module + "."
            base = {
                k[len(prefix) :]: v for k, v in self.base.shapes.items() if k.startswith(prefix)
            }
            if not base:
                continue
            state = adapter.full_state(module)
            for param, tensor in sorted(state.items()):
                where = f"full.{module}.{param}"
                shape = tuple(tensor.shape)
                if param not in base:
                    raise ValueError(f"{where}: the base's {module!r} has no parameter {param!r}")
                want: tuple[int, ...]
                if module in self.base.linear and param in ("weight", "bias"):
                    outputs = state["weight"].shape[0] if "weight" in state else base["weight"][0]
                    want = (outputs, base["weight"][1]) if param == "weight" else (outputs,)
                else:
                    want = base[param]
                if shape != tuple(want):
                    raise ValueError(
                        f"{where} has shape {list(shape)}, the base's {module!r} needs "
                        f"{list(want)}"
                        + (
                            " (only the number of outputs may differ)"
                            if module in self.base.linear
                            else ""
                        )
                    )
