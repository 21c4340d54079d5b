"""flora.serving merged mode: merged == batched, exact restore, failed merges change nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from test_serving_layers import DEVICES, SHAPES, Toy, inputs, make_adapters, make_factors

from flora.serving import ServingModel


def loaded(seed: int = 0, device: str = "cpu") -> tuple[ServingModel, Toy]:
    torch.manual_seed(seed)
    base = Toy().to(device)
    ref = copy.deepcopy(base)
    serving = ServingModel(base, max_slots=3)
    for slot, modules in enumerate(make_adapters(seed)):
        serving.load_modules(slot, modules)
    return serving, ref


def base_weights(serving: ServingModel) -> dict[str, torch.Tensor]:
    return {n: w.weight.detach().clone() for n, w in serving.named_wrappers()}


@pytest.mark.parametrize("device", DEVICES)
def test_merged_equals_batched_for_homogeneous_batch(device: str) -> None:
    serving, _ = loaded(device=device)
    gen = torch.Generator().manual_seed(7)
    xs = {name: inputs(name, 4, 3, gen).to(device) for name in SHAPES}
    with torch.no_grad():
        serving.set_routing([1, 1, 1, 1])
        batched = {n: getattr(serving.model, n)(x) for n, x in xs.items()}
        serving.merge(1)
        assert serving.merged_slot == 1
        assert all(p is None for p in serving.routing.plans)  # never applied twice
        merged = {n: getattr(serving.model, n)(x) for n, x in xs.items()}
        serving.unmerge()
        again = {n: getattr(serving.model, n)(x) for n, x in xs.items()}
    for n in SHAPES:
        torch.testing.assert_close(merged[n], batched[n], atol=1e-5, rtol=1e-5, msg=n)
        torch.testing.assert_close(again[n], batched[n], atol=0, rtol=0, msg=n)


def test_routing_rules_while_merged() -> None:
    serving, _ = loaded()
    serving.merge(0)
    with pytest.raises(ValueError, match="merged"):
        serving.set_routing([0, -1])
    with pytest.raises(ValueError, match="merged"):
        serving.set_routing([0, 1])
    serving.set_routing([0, 0])
    serving.unmerge()  # the same routing now runs per row
    assert any(p is not None for p in serving.routing.plans)


@pytest.mark.parametrize("device", DEVICES)
def test_thousand_merge_cycles_restore_base_bitwise(device: str) -> None:
    serving, ref = loaded(device=device)
    before = base_weights(serving)
    for i in range(1000):
        serving.merge(i % 3)
        if i % 3 == 0:
            assert not torch.equal(serving.model.lin.weight, before["lin"])
        serving.unmerge()
    after = base_weights(serving)
    for name in before:
        assert torch.equal(after[name], before[name]), name
        assert torch.equal(after[name], getattr(ref, name).weight), name
    # host copies only for the modules that were merged, pinned when the device is CUDA
    assert set(serving._merged.host) == set(before)
    for host in serving._merged.host.values():
        assert host.device.type == "cpu" and host.is_pinned() == (device == "cuda")


def test_switching_merged_slot_restores_first() -> None:
    serving, ref = loaded()
    serving.merge(0)
    serving.merge(2)  # unmerges 0 first: conv (not in adapter 2) is the base again
    assert torch.equal(serving.model.conv.weight, ref.conv.weight)
    assert serving.merged_slot == 2
    serving.unload(2)  # unloading the merged slot unmerges it
    assert serving.merged_slot is None
    assert torch.equal(serving.model.lin.weight, ref.lin.weight)


def test_non_finite_merge_raises_and_changes_nothing() -> None:
    serving, _ = loaded()
    poisoned = make_adapters(seed=3)[0]
    # a huge (finite) conv factor: W + dW overflows float32 in one module
    conv = poisoned["conv"]
    poisoned["conv"] = type(conv)(conv.kind, conv.core * 1e30, conv.factors, 1e30)
    serving.load_modules(2, poisoned)
    before = base_weights(serving)
    with pytest.raises(ValueError, match="non-finite"):
        serving.merge(2)
    assert serving.merged_slot is None
    for name, w in base_weights(serving).items():
        assert torch.equal(w, before[name]), name


def test_merge_cost_counts_the_rank_r_update_and_the_per_token_work() -> None:
    """Linear (12 x 16) and Conv1D (16 -> 10) at rank 3: merging is out * in * r per module,
    the per-row path (in + out) * r per token; hand-computed."""
    gen = torch.Generator().manual_seed(0)
    serving = ServingModel(Toy(), max_slots=2)
    serving.load_modules(
        1,
        {
            "lin": make_factors("linear", (12, 16), (3, 3), scale=1.0, gen=gen),
            "c1d": make_factors("hf_conv1d", (16, 10), (3, 3), scale=1.0, gen=gen),
        },
    )
    assert serving.merge_cost(1) == (12 * 16 * 3 + 16 * 10 * 3, (12 + 16) * 3 + (16 + 10) * 3)
    with pytest.raises(ValueError, match="slot 0 is not loaded"):
        serving.merge_cost(0)
