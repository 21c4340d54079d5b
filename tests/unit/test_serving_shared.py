"""flora.serving shared shrinks (q/k/v, gate/up siblings read one input): each member's
output against the per-row reference, for both kernels, and no reuse of a stale shrink."""

from __future__ import annotations

import copy

import pytest
import torch
from test_serving_layers import make_factors
from torch import nn

from flora.serving import ServingModel, ServingPolicy, reference_forward

NAMES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj")
OUT = {"q_proj": 16, "k_proj": 8, "v_proj": 8, "gate_proj": 24, "up_proj": 24, "o_proj": 16}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for n in NAMES:
            setattr(self, n, nn.Linear(16, OUT[n]))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])


def adapters(gen: torch.Generator) -> list[dict]:
    """Different ranks per adapter and module; adapter 2 skips k_proj and up_proj."""
    out = []
    for k, ranks in enumerate([(2, 3), (4, 4), (3, 1)]):
        mods = {}
        for layer in range(2):
            for n in NAMES:
                if k == 2 and n in ("k_proj", "up_proj"):
                    continue
                mods[f"layers.{layer}.{n}"] = make_factors("linear", (OUT[n], 16), ranks, 0.5, gen)
        out.append(mods)
    return out


POLICIES = {
    "wide": ServingPolicy(wide_max_rank=1000, cpu_kernel=False),
    "rows": ServingPolicy(wide_max_rank=0, cpu_kernel=False),
    "kernel": ServingPolicy(),  # the fused CPU kernel: siblings share one kernel call
}


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("routing", [[0, 1, None, 2, 1], [2, 2, 2], [1, 1]])
@pytest.mark.parametrize("t", [1, 3, 16])  # 16: the kernel policy's prefill-sized path
def test_shared_shrink_matches_reference(policy: str, routing: list, t: int) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = Net()
    ref = copy.deepcopy(net)
    ads = adapters(gen)
    serving = ServingModel(net, max_slots=3, policy=POLICIES[policy])
    for slot, mods in enumerate(ads):
        serving.load_modules(slot, mods)
    serving.set_routing(routing)
    plans = dict(zip(serving.wrapped_modules(), serving.routing.plans, strict=True))
    if policy == "kernel":  # q/k/v share one set of row deltas, gate/up another
        groups = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj",)]
        shared = []
        for group in groups:
            live = [plans[f"layers.0.{n}"] for n in group if plans[f"layers.0.{n}"] is not None]
            assert len({id(p.deltas) for p in live}) == 1
            shared.append(live[0].deltas)
        assert len({id(d) for d in shared}) == 3
    else:
        kinds = {type(p).__name__ for p in plans.values() if p is not None}
        assert "_SharedPlan" in kinds  # the siblings really share
    x = torch.randn(len(routing), t, 16, generator=gen)
    with torch.no_grad():
        for layer in range(2):
            block = net.layers[layer]
            got = {n: getattr(block, n)(x) for n in NAMES}  # q, k, v, gate, up on one x
            for n in NAMES:
                name = f"layers.{layer}.{n}"
                slots = {k: a[name] for k, a in enumerate(ads) if name in a}
                want = reference_forward(getattr(ref.layers[layer], n), x, routing, slots)
                torch.testing.assert_close(got[n], want, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("policy", ["wide", "kernel"])
def test_no_stale_shrink_for_a_reused_input_buffer(policy: str) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    net = Net()
    ref = copy.deepcopy(net)
    ads = adapters(gen)
    serving = ServingModel(net, max_slots=3, policy=POLICIES[policy])
    for slot, mods in enumerate(ads):
        serving.load_modules(slot, mods)
    routing = [0, 1, 2]
    serving.set_routing(routing)
    block, rblock = net.layers[0], ref.layers[0]
    buf = torch.randn(3, 1, 16, generator=gen)

    def want(n: str, x: torch.Tensor) -> torch.Tensor:
        name = f"layers.0.{n}"
        slots = {k: a[name] for k, a in enumerate(ads) if name in a}
        return reference_forward(getattr(rblock, n), x, routing, slots)

    with torch.no_grad():
        block.q_proj(buf)  # k and v not called yet: a shrink of this buf is pending
        buf.copy_(torch.randn(3, 1, 16, generator=gen))  # the buffer is reused in place
        # q again on the same object: q already took its slice, so this is fresh
        torch.testing.assert_close(block.q_proj(buf), want("q_proj", buf), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(block.k_proj(buf), want("k_proj", buf), atol=1e-5, rtol=1e-5)
        other = torch.randn(3, 1, 16, generator=gen)  # a different tensor: own shrink
        torch.testing.assert_close(block.v_proj(other), want("v_proj", other), atol=1e-5, rtol=1e-5)
