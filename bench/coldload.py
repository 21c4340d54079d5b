"""Adapter cold load (store -> usable) and the cost of a merged-mode swap (issue 6, item 5).

Cold load is what the engine pays when a request names an adapter on no device slot and
in no host cache: read the stored file (``LocalAdapterStore``, digest-checked), parse and
validate it (``load_adapter`` + ``validate_against`` with the base's specs and fingerprint,
computed once per process as the server does), check that the folded update is finite
(``ServingModel.check``, the engine cache's loader-thread check), then copy it into a
device slot (``ServingModel.load``: fold the cores, check, write the banks).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.workload import PROJECTIONS
from flora.serving import ServingModel


@dataclass
class StoredFixture:
    store: Any
    adapter_id: str
    specs: Any
    fingerprint: str
    params: int
    tmp: tempfile.TemporaryDirectory


def prepare(model: nn.Module, rank: int = 8) -> StoredFixture:
    """Save one rank-``rank`` adapter on the 7 projections into a local store. Must run
    before ``ServingModel`` wraps ``model`` (the saved fingerprint is the bare base's)."""
    import flora
    from flora.adapter import save_adapter
    from flora.fingerprint import base_fingerprint, describe_base
    from flora_server.adapters.store import LocalAdapterStore

    tmp = tempfile.TemporaryDirectory(prefix="flora-bench-")
    root = Path(tmp.name)
    flora.inject(model, flora.FloraConfig(target_modules=list(PROJECTIONS), rank=rank))
    gen = torch.Generator().manual_seed(7)
    params = 0
    with torch.no_grad():
        for _, layer in flora.adapter_layers(model):
            layer.core.copy_(torch.randn(layer.core.shape, generator=gen) * 0.1)
            params += sum(u.numel() for u in layer.factors) + layer.core.numel()
    path = save_adapter(model, root / "bench.flora", base_model_id="smollm2-135m-instruct")
    flora.eject(model)
    store = LocalAdapterStore(root / "store")
    with path.open("rb") as f:
        store.put("bench-cold", f)
    return StoredFixture(
        store, "bench-cold", describe_base(model), base_fingerprint(model), params, tmp
    )


def cold_load_suite(serving: ServingModel, fx: StoredFixture, repeats: int, slot: int) -> dict:
    """Median and p90 store -> usable time (ms) over ``repeats`` loads into ``slot``, and
    the merge / unmerge times of that slot."""
    from flora.adapter import load_adapter, validate_against

    loads = []
    for _ in range(repeats):
        start = time.perf_counter()
        adapter = load_adapter(fx.store.get_bytes(fx.adapter_id))
        validate_against(adapter, fx.specs, fx.fingerprint)
        serving.check(adapter)
        serving.load(slot, adapter)
        loads.append(time.perf_counter() - start)
    merges, unmerges = [], []
    for _ in range(max(3, repeats // 2)):
        start = time.perf_counter()
        serving.merge(slot)
        merges.append(time.perf_counter() - start)
        start = time.perf_counter()
        serving.unmerge()
        unmerges.append(time.perf_counter() - start)
    loads.sort()
    return {
        "cold_load_ms_p50": 1000 * statistics.median(loads),
        "cold_load_ms_p90": 1000 * loads[int(0.9 * (len(loads) - 1))],
        "cold_load_adapter_params": fx.params,
        "merge_ms_p50": 1000 * statistics.median(merges),
        "unmerge_ms_p50": 1000 * statistics.median(unmerges),
    }
