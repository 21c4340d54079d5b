"""`adapters/derived.build_merge` on a fake registry: the registry hands out `LoadedAdapter`s
(adapter + stored digest), and the merge must be of the adapters inside them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import flora
from flora.adapter import Adapter, adapter_from_model, load_archive_bytes
from flora.merging import merge_adapters
from flora_server.adapters.derived import InputChangedError, build_merge
from flora_server.adapters.registry import StagedUpload
from flora_server.engine.protocol import LoadedAdapter


def _adapter(seed: int) -> Adapter:
    torch.manual_seed(100)
    model = nn.Sequential(nn.Linear(6, 5))
    flora.inject(model, flora.FloraConfig(target_modules=["0"], rank=2))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in flora.adapter_layers(model):
            layer.core.copy_(torch.randn(layer.core.shape, generator=gen))
            for u in layer.factors:
                u.copy_(torch.randn(u.shape, generator=gen))
    return adapter_from_model(model, "tiny")


class _Registry:
    def __init__(self, tmp: Path, adapters: dict[str, Adapter]) -> None:
        self.tmp = tmp
        self.adapters = adapters
        self.stored: dict[str, bytes] = {}

    def load(self, adapter_id: str) -> LoadedAdapter:
        return LoadedAdapter(self.adapters[adapter_id], f"sha-{adapter_id}")

    def stat(self, adapter_id: str) -> SimpleNamespace:
        return SimpleNamespace(sha256=f"sha-{adapter_id}")

    @contextlib.contextmanager
    def staging_file(self, name: str) -> Iterator[Path]:
        yield self.tmp / name

    def put(self, adapter_id: str, upload: StagedUpload, overwrite: bool) -> None:
        self.stored[adapter_id] = upload.archive.read_bytes()


def test_build_merge_stores_the_merge_of_the_adapters_the_registry_loads(tmp_path) -> None:
    a, b = _adapter(1), _adapter(2)
    registry = _Registry(tmp_path, {"a": a, "b": b})
    adapter_id = "merge-00c0ffee"
    build_merge(
        registry, adapter_id, ["a", "b"], ["sha-a", "sha-b"], [0.7, -1.3], "linear", 1.0, "total"
    )
    stored = load_archive_bytes(registry.stored[adapter_id])
    want = merge_adapters([a, b], [0.7, -1.3], seed=0x00C0FFEE, max_rank=64)
    assert stored.tensors.keys() == want.tensors.keys()
    for key, tensor in want.tensors.items():
        torch.testing.assert_close(stored.tensors[key], tensor, rtol=0, atol=0)


def test_build_merge_refuses_inputs_replaced_meanwhile(tmp_path) -> None:
    registry = _Registry(tmp_path, {"a": _adapter(1), "b": _adapter(2)})
    with pytest.raises(InputChangedError):
        build_merge(
            registry, "merge-1", ["a", "b"], ["sha-a", "old"], [1.0, 1.0], "linear", 1.0, "total"
        )
    assert registry.stored == {}
