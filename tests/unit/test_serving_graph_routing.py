"""ServingModel.set_graph_routing: plans that read each row's slot from a device buffer when
they run (what a recorded CUDA graph replays), and the layout_version that tells a graph
its tensors were re-bound."""

from __future__ import annotations

import pytest
import torch

from flora.serving import ServingModel, ServingPolicy
from tests.unit.test_cpu_kernel import Proj, linear_adapter


@pytest.mark.parametrize("policy", [ServingPolicy(), ServingPolicy(cpu_kernel=False)])
def test_graph_plans_follow_the_buffer_and_equal_per_row_routing(policy) -> None:
    torch.manual_seed(0)
    serving = ServingModel(Proj(), max_slots=3, policy=policy)
    serving.load_modules(0, linear_adapter(4, seed=0))
    serving.load_modules(1, linear_adapter(8, seed=1))
    x = torch.randn(5, 1, 24)
    slots = torch.full((5,), -1, dtype=torch.int32)
    serving.set_graph_routing(slots)
    graph_plan = serving.routing.plans[0]
    for routing in ([0, 1, None, 1, 0], [None] * 5, [1, 1, 1, 1, 0]):
        slots.copy_(torch.tensor([-1 if s is None else s for s in routing], dtype=torch.int32))
        got = graph_plan(x)  # built once, reading the refilled buffer
        serving.set_routing(routing)
        torch.testing.assert_close(got, serving.model.q(x), rtol=1e-5, atol=1e-5)
    # A slot loaded after the plan was built is read in place (same bank tensors).
    bank = dict(serving.named_wrappers())["q"].bank  # type: ignore[attr-defined]
    ptrs, version = (bank.a.data_ptr(), bank.b.data_ptr()), serving.layout_version
    serving.load_modules(2, linear_adapter(8, seed=2))
    assert (bank.a.data_ptr(), bank.b.data_ptr()) == ptrs
    assert serving.layout_version == version
    slots.copy_(torch.tensor([2, 2, -1, 0, 1], dtype=torch.int32))
    got = graph_plan(x)
    serving.set_routing([2, 2, None, 0, 1])
    torch.testing.assert_close(got, serving.model.q(x), rtol=1e-5, atol=1e-5)


def test_layout_version_changes_when_a_bank_grows_and_merged_mode_refuses() -> None:
    serving = ServingModel(Proj(), max_slots=2, policy=ServingPolicy(cpu_kernel=False))
    v0 = serving.layout_version
    serving.load_modules(0, linear_adapter(4, seed=0))  # wraps q: re-binds a module
    v1 = serving.layout_version
    assert v1 != v0
    serving.load_modules(1, linear_adapter(8, seed=1))  # capacity 8 holds rank 8
    assert serving.layout_version == v1
    serving.load_modules(1, linear_adapter(12, seed=1))  # grows the bank
    assert serving.layout_version != v1
    serving.merge(0)
    with pytest.raises(ValueError, match="merged"):
        serving.set_graph_routing(torch.zeros(2, dtype=torch.int32))
    serving.unmerge()
    with pytest.raises(ValueError, match="int32"):
        serving.set_graph_routing(torch.zeros(2, dtype=torch.int64))


def test_triton_graph_plan_reads_the_buffer_and_full_capacity() -> None:
    """`TritonGraphPlan` on the CPU with the kernel's float64 reference in place of the
    Triton launch: it hands the kernel the caller's slot buffer (refilled between calls)
    and every slot at the bank's capacity, which equals each slot's own rank because the
    bank's padding is zero."""
    from flora.serving.backends import triton_gpu

    def kernel(y, x, slots, ranks, a, b, block_r) -> None:  # type: ignore[no-untyped-def]
        assert block_r >= int(ranks.max()) and slots.dtype == torch.int32
        y += triton_gpu.reference(x, slots.tolist(), ranks.tolist(), a, b).to(y.dtype)

    torch.manual_seed(0)
    serving = ServingModel(Proj(), max_slots=3, policy=ServingPolicy(cpu_kernel=False))
    serving.load_modules(0, linear_adapter(4, seed=0))
    serving.load_modules(1, linear_adapter(8, seed=1))
    target = dict(serving.named_wrappers())["q"]
    slots = torch.full((4,), -1, dtype=torch.int32)
    plan = triton_gpu.TritonGraphPlan(target, kernel, slots)  # type: ignore[arg-type]
    x = torch.randn(4, 1, 24)
    for routing in ([0, 1, None, 0], [1, 1, 1, 1], [None] * 4):
        slots.copy_(torch.tensor([-1 if s is None else s for s in routing], dtype=torch.int32))
        got = plan(x)
        serving.set_routing(routing)
        torch.testing.assert_close(got, serving.model.q(x), rtol=1e-5, atol=1e-5)
