"""flora.serving load/merge fast paths: batched folds, finiteness proofs, in-place merge,
each against the plain per-module computation."""

from __future__ import annotations

import pytest
import torch
from test_serving_layers import make_factors
from torch import nn

from flora.serving import ModuleFactors, ServingModel
from flora.serving.factors import (
    all_finite,
    fold_is_finite,
    fold_two_mode,
    fold_two_mode_many,
    tucker_full,
)


def mixed_items(seed: int = 0) -> list[ModuleFactors]:
    """Groups of equal shapes (batched), singletons, both fold orientations, three kinds."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(3):
        items.append(make_factors("linear", (12, 16), (2, 6), 0.5, gen))  # core joins B
        items.append(make_factors("linear", (12, 16), (6, 2), 0.5, gen))  # core joins A
        items.append(make_factors("hf_conv1d", (16, 10), (3, 3), 2.0, gen))
    items.append(make_factors("embedding", (20, 16), (8, 5), 1.5, gen))
    items.append(make_factors("linear", (12, 16), (2, 6), 3.0, gen))  # other scale: own group
    return items


def test_batched_fold_matches_per_module_fold_and_full_update() -> None:
    items = mixed_items()
    for mf, (a, b) in zip(items, fold_two_mode_many(items), strict=True):
        a_ref, b_ref = fold_two_mode(mf)
        torch.testing.assert_close(a, a_ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(b, b_ref, atol=1e-6, rtol=1e-5)
        # and the folded product is the update itself, in the activation orientation
        full = tucker_full(mf.core, mf.factors, mf.scale)
        expected = full.t() if mf.kind == "linear" else full
        torch.testing.assert_close(a @ b, expected, atol=1e-5, rtol=1e-5)


def test_all_finite_is_exact_even_when_the_sum_overflows() -> None:
    big = torch.full((4, 4), 3e38)
    assert all_finite([big, torch.ones(3)])  # sum overflows, every value finite
    assert not all_finite([torch.ones(3), torch.tensor([1.0, float("inf")])])
    assert not all_finite([torch.tensor([float("nan")])])
    assert all_finite([])


def _with(mf: ModuleFactors, core: torch.Tensor, u_out: torch.Tensor | None = None):
    factors = mf.factors if u_out is None else (u_out, mf.factors[1])
    return ModuleFactors(mf.kind, core, factors, mf.scale)


def _huge(mf: ModuleFactors) -> ModuleFactors:
    """Finite tensors (1e30) whose folded product (about 1e60) overflows float32."""
    return ModuleFactors(mf.kind, mf.core * 1e30, tuple(u * 1e30 for u in mf.factors), mf.scale)


def test_fold_is_finite_agrees_with_folding() -> None:
    gen = torch.Generator().manual_seed(1)
    ok = [make_factors("linear", (12, 16), (2, 6), 1.0, gen) for _ in range(3)]
    assert fold_is_finite(ok)
    # finite core and factors whose product overflows float32
    huge = _huge(ok[0])
    assert not all_finite(fold_two_mode(huge))
    assert not fold_is_finite([*ok, huge])
    # the bound (0.5 * 3e38 > 1e38) fails but the fold (A = U_in C, entries 1.5e38) is
    # finite: the exact check runs and says so
    core = torch.zeros(2, 6)
    core[0, 0], core[1, 0] = 3e38, -3e38
    near = ModuleFactors("linear", core, (torch.ones(12, 2), torch.full((16, 6), 0.5)), 1.0)
    assert all_finite(fold_two_mode(near))
    assert float(fold_two_mode(near)[0].abs().max()) == pytest.approx(1.5e38)
    assert fold_is_finite([*ok, near])
    nan = _with(ok[1], ok[1].core.clone().fill_(float("nan")))
    assert not fold_is_finite([nan])


class _FakeAdapter:
    """The parts of ``flora.Adapter`` that ``modules_from_adapter`` reads."""

    def __init__(self, modules: dict[str, ModuleFactors]) -> None:
        self.config = type("C", (), {"scale": 1.0})()
        self._m = modules
        self.modules = {n: type("E", (), {"kind": mf.kind})() for n, mf in modules.items()}

    def layer_names(self) -> list[str]:
        return list(self._m)

    def core(self, name: str) -> torch.Tensor:
        return self._m[name].core

    def factors(self, name: str) -> tuple[torch.Tensor, ...]:
        return self._m[name].factors


def test_check_names_the_module_whose_folded_update_overflows() -> None:
    gen = torch.Generator().manual_seed(2)
    good = {f"l{i}": make_factors("linear", (12, 16), (2, 6), 1.0, gen) for i in range(3)}
    serving = ServingModel(
        nn.ModuleDict({f"l{i}": nn.Linear(16, 12) for i in range(3)}), max_slots=1
    )
    serving.check(_FakeAdapter(good))
    bad = dict(good)
    bad["l1"] = _huge(good["l1"])
    with pytest.raises(ValueError, match="l1: the update overflows"):
        serving.check(_FakeAdapter(bad))
    with pytest.raises(ValueError, match="overflows"):  # load refuses what check refuses
        serving.load(0, _FakeAdapter(bad))
    assert serving.slot_modules(0) is None


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 12)
        self.b = nn.Linear(16, 12)


def test_load_refuses_an_overflowing_fold_and_changes_nothing() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    serving = ServingModel(Two(), max_slots=2)
    good = {n: make_factors("linear", (12, 16), (2, 6), 1.0, gen) for n in ("a", "b")}
    serving.load_modules(0, good)
    bank_before = serving._wrapped["a"].bank.a.clone()
    bad = dict(good)
    bad["b"] = _huge(good["b"])
    with pytest.raises(ValueError, match="non-finite"):
        serving.load_modules(1, bad)
    assert serving.slot_modules(1) is None
    assert torch.equal(serving._wrapped["a"].bank.a, bank_before)


def test_inplace_merge_equals_reference_and_restores_bitwise() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4)
    model = Two()
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    serving = ServingModel(model, max_slots=1)
    mods = {n: make_factors("linear", (12, 16), (6, 2), 0.7, gen) for n in ("a", "b")}
    serving.load_modules(0, mods)
    serving.merge(0)
    for n, mf in mods.items():
        expected = ref[f"{n}.weight"] + tucker_full(mf.core, mf.factors, mf.scale)
        torch.testing.assert_close(getattr(model, n).weight, expected, atol=1e-5, rtol=1e-5)
    serving.unmerge()
    for n in ("a", "b"):
        assert torch.equal(getattr(model, n).weight, ref[f"{n}.weight"])


def test_merge_keeps_finite_weights_whose_sum_overflows() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    model = Two()
    with torch.no_grad():
        model.a.weight.fill_(3e38)  # finite, but the weight's sum is inf
    serving = ServingModel(model, max_slots=1)
    mods = {"a": make_factors("linear", (12, 16), (2, 6), 1e-3, gen)}
    serving.load_modules(0, mods)
    serving.merge(0)
    assert serving.merged_slot == 0
    expected = torch.full((12, 16), 3e38) + tucker_full(mods["a"].core, mods["a"].factors, 1e-3)
    torch.testing.assert_close(model.a.weight, expected)
    serving.unmerge()
    assert torch.equal(model.a.weight, torch.full((12, 16), 3e38))


def test_reload_with_fewer_modules_and_lower_rank_leaves_no_trace() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(6)
    model = Two()
    serving = ServingModel(model, max_slots=1)
    serving.load_modules(0, {n: make_factors("linear", (12, 16), (8, 8), 1.0, gen) for n in "ab"})
    small = make_factors("linear", (12, 16), (2, 2), 1.0, gen)
    serving.load_modules(0, {"a": small})
    assert serving.slot_modules(0) == frozenset({"a"})
    bank = serving._wrapped["a"].bank
    assert not bank.a[0, :, 2:].any() and not bank.b[0, 2:].any()  # old rank-8 columns gone
    assert not serving._wrapped["b"].bank.a[0].any()
    x = torch.randn(3, 1, 16)
    serving.set_routing([0, 0, 0])
    with torch.no_grad():
        got_a, got_b = model.a(x), model.b(x)
        base_a = torch.nn.functional.linear(x, model.a.base_layer.weight, model.a.base_layer.bias)
        delta = tucker_full(small.core, small.factors, small.scale)
        torch.testing.assert_close(got_a, base_a + x @ delta.t(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_b, model.b.base_layer(x))


def test_loading_another_slot_keeps_current_plans_and_reloading_a_used_slot_rebuilds() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(7)
    model = Two()
    serving = ServingModel(model, max_slots=3)

    def adapter() -> dict[str, ModuleFactors]:
        return {n: make_factors("linear", (12, 16), (4, 4), 1.0, gen) for n in "ab"}

    first = [adapter(), adapter()]
    for slot, mods in enumerate(first):
        serving.load_modules(slot, mods)
    x = torch.randn(2, 1, 16)

    def expected(mods: list[dict[str, ModuleFactors]]) -> torch.Tensor:
        out = []
        for i, m in enumerate(mods):
            d = tucker_full(m["a"].core, m["a"].factors, 1.0)
            out.append(model.a.base_layer(x[i]) + x[i] @ d.t())
        return torch.stack(out)

    serving.set_routing([0, 1])
    plans = serving.routing.plans
    serving.load_modules(2, adapter())  # not in the running batch: its plans stay
    assert serving.routing.plans is plans
    with torch.no_grad():
        torch.testing.assert_close(model.a(x), expected(first), atol=1e-5, rtol=1e-5)
    replaced = adapter()
    serving.load_modules(1, replaced)  # in the running batch: rebuilt
    assert serving.routing.plans is not plans
    with torch.no_grad():
        torch.testing.assert_close(model.a(x), expected([first[0], replaced]), atol=1e-5, rtol=1e-5)
