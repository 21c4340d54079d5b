"""The in-memory adapter: a validated config plus named tensors."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from flora.adapter.schema import AdapterHeader, AdapterModule
from flora.config import FloraConfig, name_matches
from flora.errors import AdapterError

CORE_KEY = "flora.{module}.core"
FACTOR_KEY = "flora.{module}.factor.{mode}"
FULL_PREFIX = "full."


def core_key(module: str) -> str:
    """Safetensors key of module ``module``'s core ``G``."""
    return CORE_KEY.format(module=module)


def factor_key(module: str, mode: int) -> str:
    """Safetensors key of module ``module``'s factor ``U_mode``."""
    return FACTOR_KEY.format(module=module, mode=mode)


def split_full_key(key: str, train_modules: list[str] | str) -> tuple[str, str] | None:
    """Split ``full.<module>.<param>`` into ``(module, param)``.

    Module names hold dots, so the module is the shortest dotted prefix selected by
    ``train_modules`` (the outermost trained module); ``None`` when no prefix is.
    """
    if not key.startswith(FULL_PREFIX):
        return None
    parts = key[len(FULL_PREFIX) :].split(".")
    for cut in range(1, len(parts)):
        module = ".".join(parts[:cut])
        if train_modules and name_matches(module, train_modules):
            return module, ".".join(parts[cut:])
    return None


@dataclass(frozen=True)
class Adapter:
    """A FLoRA adapter ready to apply: every field already validated.

    ``tensors`` keys: ``flora.<module>.core`` (shape ``(r_1..r_N)``),
    ``flora.<module>.factor.<m>`` (shape ``(d_m, r_m)``) and ``full.<module>.<param>``
    (a ``train_modules`` parameter saved whole). ``fingerprint`` is ``None`` only for
    adapters imported from another format without a base to hash.
    """

    config: FloraConfig
    tensors: dict[str, torch.Tensor]
    modules: dict[str, AdapterModule]
    base_model_id: str | None = None
    fingerprint: str | None = None
    task: str | None = None
    labels: list[str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: str | None = None
    library_version: str | None = None

    # -- views ----------------------------------------------------------------------

    def layer_names(self) -> list[str]:
        """Adapted module names, sorted."""
        return sorted(self.modules)

    def core(self, name: str) -> torch.Tensor:
        """Core ``G`` of module ``name``."""
        return self.tensors[core_key(name)]

    def factors(self, name: str) -> list[torch.Tensor]:
        """Factors ``U_0..U_{N-1}`` of module ``name`` in mode order."""
        n = len(self.modules[name].ranks)
        return [self.tensors[factor_key(name, m)] for m in range(n)]

    def full_modules(self) -> list[str]:
        """Names of ``train_modules`` modules saved whole, sorted."""
        out = set()
        for key in self.tensors:
            split = split_full_key(key, self.config.train_modules)
            if split is not None:
                out.add(split[0])
        return sorted(out)

    def full_state(self, module: str) -> dict[str, torch.Tensor]:
        """``{param: tensor}`` of a trained module (``full.<module>.<param>`` entries)."""
        out = {}
        for key, tensor in self.tensors.items():
            split = split_full_key(key, self.config.train_modules)
            if split is not None and split[0] == module:
                out[split[1]] = tensor
        return out

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Adapter:
        """A copy with every tensor moved to ``device`` and/or cast to ``dtype``."""
        moved = {k: v.to(device=device, dtype=dtype) for k, v in self.tensors.items()}
        return replace(self, tensors=moved)

    # -- header ---------------------------------------------------------------------

    def header(self) -> AdapterHeader:
        """The adapter_config.json contents of this adapter."""
        return AdapterHeader(
            config=self.config,
            base_model_id=self.base_model_id,
            fingerprint=self.fingerprint,
            modules=self.modules,
            task=self.task,
            labels=self.labels,
            created_at=self.created_at,
            library_version=self.library_version,
            metadata=self.metadata,
        )


def adapter_sha256(adapter: Adapter) -> str:
    """``"sha256:" + hex`` over what decides the adapter's outputs.

    Covers config, base fingerprint, module table, task, labels and every tensor (name,
    dtype, shape, bytes); leaves out ``created_at``, ``library_version`` and ``metadata``,
    so saving the same weights twice gives the same digest (idempotent uploads).
    """
    doc = adapter.header().to_json_dict()
    for volatile in ("created_at", "library_version", "metadata"):
        doc.pop(volatile)
    h = hashlib.sha256()
    _feed(h, json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(adapter.tensors):
        t = adapter.tensors[name].detach().to("cpu").contiguous()
        for part in (name, str(t.dtype), str(tuple(t.shape))):
            _feed(h, part.encode())
        _feed(h, t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _feed(h: Any, data: bytes) -> None:
    # Length-prefix every field so bytes cannot shift between fields unnoticed.
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def require(condition: bool, error: type[AdapterError], message: str) -> None:
    """Raise ``error(message)`` unless ``condition``."""
    if not condition:
        raise error(message)
