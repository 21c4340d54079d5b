"""Upload validation against the loaded base: `flora.load_adapter`, the base's module
table and fingerprint, whole-saved modules that must fit, and what the engine can serve."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flora_server.adapters.registry import AdapterValidationError

if TYPE_CHECKING:
    from flora.adapter import Adapter
    from flora.models import StoredLayout

logger = logging.getLogger(__name__)


class BaseWeightsUnavailableError(ValueError):
    """The base's weights file was not readable at start-up: adapters that retrain whole
    modules cannot be fingerprinted against it (a ValueError: such an upload is refused)."""


@dataclass(frozen=True)
class BaseSnapshot:
    """The base as uploads are checked against, taken before the engine runs: an engine
    wraps modules (`<module>.base_layer.weight`), may merge an adapter into the weights or
    swap a head later, so nothing here refers to the live model."""

    name: str
    specs: dict[str, Any]  # describe_base: module name -> ModuleSpec
    fingerprint: str
    shapes: dict[str, tuple[int, ...]]  # state-dict key -> shape
    linear: frozenset[str]  # names of nn.Linear modules
    module_names: tuple[str, ...]  # named_modules order, for `train_modules`
    # where the pristine weights lie in the weights file, or why that is not known
    weights: StoredLayout | None
    weights_problem: str | None = None

    @classmethod
    def of(cls, loaded: Any) -> BaseSnapshot:
        from torch import nn

        from flora.fingerprint import describe_base
        from flora.models import ModelError, stored_layout

        model = loaded.model
        weights, problem = None, None
        try:
            weights = stored_layout(loaded)
        except ModelError as exc:  # only adapters with train_modules need it: serve the rest
            problem = str(exc)
            logger.warning("adapters with train_modules cannot be checked: %s", problem)
        return cls(
            name=str(getattr(loaded, "name", "") or "this base"),
            specs=describe_base(model),
            fingerprint=loaded.fingerprint,
            shapes={k: tuple(v.shape) for k, v in model.state_dict().items()},
            linear=frozenset(n for n, m in model.named_modules() if isinstance(m, nn.Linear)),
            module_names=tuple(n for n, _ in model.named_modules()),
            weights=weights,
            weights_problem=problem,
        )


class BaseValidator:
    """Reads an adapter file with `flora.load_adapter` and checks it against the base's module
    table and fingerprint, then asks the engine whether it can serve it (`engine_check`,
    ValueError when not). flora errors and ValueErrors become `AdapterValidationError`."""

    def __init__(self, base: BaseSnapshot, engine_check: Callable[[Adapter], None]) -> None:
        self.base = base
        self.base_name = base.name
        self.engine_check = engine_check
        self._partial: dict[tuple[str, ...], str] = {}
        self._partial_lock = threading.Lock()

    def _fingerprint_for(self, train_modules: list[str] | str) -> str:
        """This base's fingerprint less the modules `train_modules` selects (what an adapter
        that retrains them whole carries), from the pristine weights file through the
        start-up layout: the same whatever the engine has wrapped or merged since.

        Raises `BaseWeightsUnavailableError` when the weights file was not readable at
        start-up; a file that became unreadable or changed since raises
        `flora.models.ModelError` (a server fault, never the adapter's)."""
        if not train_modules:
            return self.base.fingerprint
        key = (train_modules,) if isinstance(train_modules, str) else tuple(train_modules)
        with self._partial_lock:  # one read of the weights file per distinct train_modules
            if key not in self._partial:
                from flora.adapter.io import trained_module_names
                from flora.fingerprint import base_fingerprint

                if self.base.weights is None:
                    raise BaseWeightsUnavailableError(
                        "adapters that retrain whole modules (train_modules) cannot be "
                        f"checked against {self.base_name}: {self.base.weights_problem}"
                    )
                names = trained_module_names(self.base.module_names, train_modules)
                prefixes = tuple(n + "." for n in names)
                # keyed like the base, tied copies (lm_head) filled in, as training hashes it
                state = self.base.weights.read()
                self._partial[key] = base_fingerprint(
                    {k: v for k, v in state.items() if not k.startswith(prefixes)}
                )
            return self._partial[key]

    def foreign_base(self, config: dict[str, Any]) -> str | None:
        """For a stored adapter's config JSON (`adapter_config` in its header): None when
        it was trained for this base (its fingerprint is this base's, less the modules it
        retrains whole), else the base it names (`base_model.id`, or its fingerprint). An
        adapter without a fingerprint (imported) is this base's if it validates; one whose
        `train_modules` is malformed is this base's only if its fingerprint is this base's
        whole one (its validation then names the problem).

        A failure to compute this base's fingerprint (its weights file unreadable) raises:
        it is never taken as a verdict, which would hide the adapter or, in a shared store,
        hand another base's adapter to this server."""
        from flora.config import check_patterns

        base = config.get("base_model")
        base = base if isinstance(base, dict) else {}
        fingerprint = base.get("fingerprint")
        if not isinstance(fingerprint, str):
            return None
        settings = config.get("config")
        train_modules = settings.get("train_modules") if isinstance(settings, dict) else None
        try:
            train = check_patterns("train_modules", train_modules or [], False)
        except ValueError:  # FloraConfig would refuse it: judged by the whole base
            train = []
        mine = self._fingerprint_for(train)
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
