"""flora.serving fast paths vs the per-row reference, layer by layer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from flora.serving import ModuleFactors, ServingModel, ServingPolicy, reference_forward


def make_factors(
    kind: str, shape: tuple[int, ...], ranks: tuple[int, ...], scale: float, gen: torch.Generator
) -> ModuleFactors:
    core = torch.randn(ranks, generator=gen)
    factors = tuple(
        torch.randn(d, r, generator=gen) / d**0.5 for d, r in zip(shape, ranks, strict=True)
    )
    return ModuleFactors(kind=kind, core=core, factors=factors, scale=scale)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 12)
        self.c1d = Conv1D(10, 16)  # (nf=out, nx=in): weight (in, out) = (16, 10)
        self.emb = nn.Embedding(20, 16, padding_idx=0)
        self.conv = nn.Conv2d(4, 6, 3, padding=1, stride=2)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
        self.gconv = nn.Conv2d(6, 4, 1, groups=2)


SHAPES = {
    "lin": ("linear", (12, 16)),
    "c1d": ("hf_conv1d", (16, 10)),
    "emb": ("embedding", (20, 16)),
    "conv": ("conv2d", (6, 4, 3, 3)),
    "dw": ("conv2d", (6, 1, 3, 3)),
    "gconv": ("conv2d", (4, 3, 1, 1)),
}
# Per adapter, per module: ranks (different per adapter and per mode; some fold each way).
RANKS = [
    {
        "lin": (2, 6),
        "c1d": (3, 3),
        "emb": (4, 2),
        "conv": (2, 3, 2, 3),
        "dw": (3, 1, 3, 3),
        "gconv": (2, 2, 1, 1),
    },
    {"lin": (8, 3), "c1d": (5, 7), "emb": (2, 5), "conv": (6, 4, 1, 2), "dw": (2, 1, 2, 2)},
    {"lin": (1, 1), "emb": (8, 8), "gconv": (4, 3, 1, 1)},  # does not target every module
]


def make_adapters(seed: int = 0) -> list[dict[str, ModuleFactors]]:
    gen = torch.Generator().manual_seed(seed)
    adapters = []
    for k, ranks in enumerate(RANKS):
        adapters.append(
            {
                name: make_factors(SHAPES[name][0], SHAPES[name][1], r, scale=1.0 + k, gen=gen)
                for name, r in ranks.items()
            }
        )
    return adapters


def inputs(name: str, rows: int, t: int, gen: torch.Generator) -> torch.Tensor:
    if name == "emb":
        return torch.randint(0, 20, (rows, t), generator=gen)
    if name in ("lin", "c1d"):
        return torch.randn(rows, t, 16, generator=gen)
    channels = {"conv": 4, "dw": 6, "gconv": 6}[name]
    return torch.randn(rows, channels, 5, 6, generator=gen)


POLICIES = {
    "wide": ServingPolicy(wide_max_rank=1000, conv_segments_max=1000, cpu_kernel=False),
    "rows": ServingPolicy(wide_max_rank=0, conv_segments_max=0, cpu_kernel=False),
    # the default: the fused CPU row kernel (decode-sized inputs) / per-row BLAS (prefill)
    "kernel": ServingPolicy(),
}
ROUTING = [0, -1, 1, 2, 0, None, 1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("t", [1, 5, 20])
def test_mixed_batch_matches_reference(policy: str, t: int, device: str) -> None:
    torch.manual_seed(0)
    base = Toy().to(device)
    ref = copy.deepcopy(base)
    adapters = make_adapters()
    serving = ServingModel(base, max_slots=4, max_rank=16, policy=POLICIES[policy])
    for slot, modules in enumerate(adapters):
        serving.load_modules(slot, modules)
    serving.set_routing(ROUTING)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in SHAPES:
            x = inputs(name, len(ROUTING), t, gen).to(device)
            got = getattr(serving.model, name)(x)
            slots = {k: a[name] for k, a in enumerate(adapters) if name in a}
            want = reference_forward(getattr(ref, name), x, ROUTING, slots)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
            # the adapter path really changed the adapted rows
            assert not torch.allclose(got[0], getattr(ref, name)(x[:1])[0], atol=1e-3), name


def test_kernel_choice_follows_policy() -> None:
    base = Toy()
    adapters = make_adapters()
    for policy, names in (
        ("wide", ("_WidePlan", "_SegmentsPlan")),
        ("rows", ("_RowsPlan", "_RowsPlan")),
        ("kernel", ("_KernelPlan", "_SegmentsPlan")),
    ):
        serving = ServingModel(copy.deepcopy(base), max_slots=4, policy=POLICIES[policy])
        for slot, modules in enumerate(adapters):
            serving.load_modules(slot, modules)
        serving.set_routing(ROUTING)
        plans = dict(zip(serving.wrapped_modules(), serving.routing.plans, strict=True))
        assert type(plans["lin"]).__name__ == names[0]
        assert type(plans["conv"]).__name__ == names[1]


def test_unused_modules_cost_nothing_and_base_rows_are_bitwise_base() -> None:
    torch.manual_seed(0)
    base = Toy()
    ref = copy.deepcopy(base)
    serving = ServingModel(base, max_slots=2)
    adapters = make_adapters()
    serving.load_modules(1, adapters[2])  # targets lin, emb, gconv only
    assert sorted(serving.wrapped_modules()) == ["emb", "gconv", "lin"]
    assert isinstance(serving.model.conv, nn.Conv2d)  # never wrapped
    serving.set_routing([None, -1, None])
    assert serving.routing.plans == [None, None, None]
    x = torch.randn(3, 2, 16)
    assert torch.equal(serving.model.lin(x), ref.lin(x))
    # slot 1 does not target c1d/conv: a routing using it leaves those as plain base
    serving.set_routing([1, 1, -1])
    plans = dict(zip(serving.wrapped_modules(), serving.routing.plans, strict=True))
    assert plans["lin"] is not None and plans["emb"] is not None


def test_routing_is_built_once_and_cached() -> None:
    base = Toy()
    serving = ServingModel(base, max_slots=3)
    for slot, modules in enumerate(make_adapters()):
        serving.load_modules(slot, modules)
    serving.set_routing([0, 1, 2])
    first = serving.routing.plans
    serving.set_routing([1, 1])
    serving.set_routing([0, 1, 2])
    assert serving.routing.plans is first  # same plan objects, nothing rebuilt
    serving.load_modules(2, make_adapters(seed=5)[2])  # a load invalidates the cache
    assert serving.routing.plans is not first


def test_bad_adapter_changes_nothing() -> None:
    base = Toy()
    serving = ServingModel(base, max_slots=2)
    good = make_adapters()[0]
    serving.load_modules(0, good)
    wrapped = serving.wrapped_modules()
    gen = torch.Generator().manual_seed(3)
    bad = dict(make_adapters(seed=1)[1])
    bad["lin"] = make_factors("linear", (12, 15), (2, 2), 1.0, gen)  # wrong in-features
    with pytest.raises(ValueError, match="lin"):
        serving.load_modules(1, bad)
    with pytest.raises(ValueError, match="no module"):
        serving.load_modules(1, {"nope": good["lin"]})
    with pytest.raises(ValueError, match="kind"):
        serving.load_modules(1, {"lin": good["c1d"]})
    assert serving.slot_modules(1) is None and serving.wrapped_modules() == wrapped
    with pytest.raises(ValueError, match="not loaded"):
        serving.set_routing([1])
    serving.set_routing([0, 0, -1, -1])
    with pytest.raises(ValueError, match="rows"):  # e.g. 2 rows x 2 tokens: never regrouped
        serving.model.lin(torch.randn(2, 2, 16))


def test_rank_growth_keeps_loaded_slots() -> None:
    torch.manual_seed(0)
    base = Toy()
    ref = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(2)
    small = {"lin": make_factors("linear", (12, 16), (2, 2), 1.0, gen)}
    big = {"lin": make_factors("linear", (12, 16), (12, 16), 0.5, gen)}
    serving = ServingModel(base, max_slots=2, max_rank=12, policy=POLICIES["rows"])
    serving.load_modules(0, small)
    assert serving.model.lin.bank.capacity == 8
    serving.load_modules(1, big)
    assert serving.model.lin.bank.capacity == 12
    x = torch.randn(3, 4, 16)
    serving.set_routing([0, 1, -1])
    with torch.no_grad():
        got = serving.model.lin(x)
    want = reference_forward(ref.lin, x, [0, 1, -1], {0: small["lin"], 1: big["lin"]})
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_rank"):
        serving.load_modules(0, {"lin": make_factors("linear", (12, 16), (13, 13), 1.0, gen)})


def test_reloading_a_slot_replaces_cached_conv_weights() -> None:
    torch.manual_seed(0)
    base = Toy()
    ref = copy.deepcopy(base)
    first, second = make_adapters(seed=0)[0], make_adapters(seed=9)[0]
    serving = ServingModel(base, max_slots=1)
    x = torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        serving.load_modules(0, first)
        serving.set_routing([0, -1])
        serving.model.conv(x)  # builds and caches W + dW(first)
        serving.load_modules(0, second)
        serving.set_routing([0, -1])
        got = serving.model.conv(x)
    want = reference_forward(ref.conv, x, [0, -1], {0: second["conv"]})
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
