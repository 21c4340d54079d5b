"""The fused CPU row kernel against a plain per-row float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flora.serving import (
    ModuleFactors,
    ServingModel,
    ServingPolicy,
    fold_two_mode,
    reference_forward,
)
from flora.serving.backends.numba_cpu import row_kernel


@pytest.fixture(scope="module")
def kernel():  # type: ignore[no-untyped-def]
    k = row_kernel()
    assert k is not None, "numba is a dependency: the kernel must be available here"
    return k


def reference(x, row_slots, at, b, ranks):  # type: ignore[no-untyped-def]
    """``x[n] @ A[s][:, :r] @ B[s][:r]`` per row, float64; zeros for rows without a slot."""
    rows = len(row_slots)
    x3 = x.double().view(rows, -1, x.shape[-1])
    out = torch.zeros(x3.shape[0], x3.shape[1], b.shape[-1], dtype=torch.float64)
    for i, s in enumerate(row_slots):
        if s < 0:
            continue
        r = ranks[s]
        a = torch.from_numpy(at[s, :r]).double().t()  # [in, r]
        out[i] = x3[i] @ a @ torch.from_numpy(b[s, :r]).double()
    return out.view(-1, b.shape[-1])


def member(gen, n_in: int, n_out: int, cap: int, ranks: list[int]):  # type: ignore[no-untyped-def]
    """One projection's bank: ``at: [S, cap, in]``, ``b: [S, cap, out]``, per-slot ranks;
    the padding beyond each slot's rank is NaN, so reading it would show."""
    at = torch.randn(len(ranks), cap, n_in, generator=gen).numpy()
    b = torch.randn(len(ranks), cap, n_out, generator=gen).numpy()
    for s, r in enumerate(ranks):
        at[s, r:] = np.nan
        b[s, r:] = np.nan
    return at, b, np.asarray(ranks, dtype=np.int32)


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("members", [1, 2, 3])
def test_mixed_ranks_and_base_rows_match_reference(kernel, tokens: int, members: int) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(members)
    n_in = 37
    # members differ in width, bank capacity and which slots target them (rank 0)
    specs = [(53, 16, [16, 3, 0, 8, 1]), (11, 8, [2, 0, 0, 8, 5]), (29, 4, [4, 4, 0, 0, 1])]
    banks = [member(gen, n_in, *spec) for spec in specs[:members]]
    row_slots = np.array([0, -1, 1, 3, 4, 0, -1, 3, 1], dtype=np.int32)  # slot 2 is empty
    x = torch.randn(len(row_slots) * tokens, n_in, generator=gen)
    ds = tuple(torch.full((x.shape[0], b.shape[2]), 7.0) for _, b, _ in banks)  # overwritten
    ats, bs, ranks = (tuple(m[i] for m in banks) for i in range(3))
    kernel(x, row_slots, ats, bs, ranks, ds)
    base_rows = torch.from_numpy(np.repeat(row_slots < 0, tokens))
    for d, (at, b, r) in zip(ds, banks, strict=True):
        torch.testing.assert_close(
            d.double(), reference(x, row_slots, at, b, r), rtol=1e-5, atol=1e-4
        )
        assert torch.equal(d[base_rows], torch.zeros_like(d[base_rows]))
    assert ds[0][~base_rows].abs().min() > 0


def test_a_non_finite_row_stays_in_its_row(kernel) -> None:  # type: ignore[no-untyped-def]
    at = np.ones((2, 4, 6), dtype=np.float32)
    b = np.ones((2, 4, 5), dtype=np.float32)
    x = torch.ones(3, 6)
    x[1, 2] = float("inf")
    d = torch.empty(3, 5)
    kernel(x, np.array([0, 1, 0], np.int32), (at,), (b,), (np.array([4, 4], np.int32),), (d,))
    assert torch.equal(d[0], torch.full((5,), 24.0)) and torch.equal(d[2], d[0])
    assert not torch.isfinite(d[1]).any()


class Proj(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(24, 40)


def linear_adapter(rank: int, seed: int) -> dict[str, ModuleFactors]:
    gen = torch.Generator().manual_seed(seed)
    core = torch.randn(rank, rank, generator=gen)
    factors = (torch.randn(40, rank, generator=gen) * 0.2, torch.randn(24, rank, generator=gen))
    return {"q": ModuleFactors("linear", core, factors, 1.0)}


def served_proj(policy: ServingPolicy, device: torch.device | str = "cpu"):  # type: ignore[no-untyped-def]
    """A ``Proj`` served with two adapters (ranks 4 and 8 in slots 0 and 1), an identical
    unserved copy for reference, and the adapters."""
    torch.manual_seed(0)
    base, ref = Proj().to(device), Proj().to(device)
    ref.load_state_dict(base.state_dict())
    serving = ServingModel(base, max_slots=3, policy=policy)
    adapters = [linear_adapter(4, seed=0), linear_adapter(8, seed=1)]
    for slot, mods in enumerate(adapters):
        serving.load_modules(slot, mods)
    return serving, ref, adapters


def test_served_linear_uses_the_kernel_and_falls_back_under_autograd() -> None:
    serving, ref, adapters = served_proj(ServingPolicy())
    routing = [1, None, 0, 1]
    serving.set_routing(routing)
    plan = serving.routing.plans[0]
    assert type(plan).__name__ == "_KernelPlan"
    slots = {k: a["q"] for k, a in enumerate(adapters)}
    for t in (1, 4, 16):  # kernel (decode, short), BLAS (prefill-sized)
        x = torch.randn(4, t, 24)
        want = reference_forward(ref.q, x, routing, slots)
        with torch.no_grad():
            torch.testing.assert_close(serving.model.q(x), want, rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # a non-contiguous input
            xt = torch.randn(4, 24, t).transpose(1, 2)
            want_t = reference_forward(ref.q, xt, routing, slots)
            torch.testing.assert_close(serving.model.q(xt), want_t, rtol=1e-5, atol=1e-5)
    assert plan.torch_path is None  # the torch path was never needed
    x = torch.randn(4, 2, 24, requires_grad=True)
    got = serving.model.q(x)  # autograd recording: the torch path, gradients flow
    got.sum().backward()
    assert plan.torch_path is not None and x.grad is not None
    torch.testing.assert_close(got, reference_forward(ref.q, x, routing, slots))


def test_bfloat16_factor_banks_match_rounded_factors_in_every_mode() -> None:
    """factor_dtype=bfloat16: the kernel reads bfloat16 bits and accumulates in float32;
    decode, prefill-sized inputs, the torch fallback and merging all use the same rounded
    factors (merged equals per-row)."""
    serving, ref, adapters = served_proj(ServingPolicy(factor_dtype=torch.bfloat16))
    assert serving._wrapped["q"].bank.b.dtype == torch.bfloat16
    rounded = [tuple(t.bfloat16().float() for t in fold_two_mode(a["q"])) for a in adapters]

    def want(x: torch.Tensor, routing: list) -> torch.Tensor:
        y = ref.q(x)
        for i, s in enumerate(routing):
            if s is not None:
                a, b = rounded[s]
                y[i] += x[i] @ a @ b
        return y

    routing = [1, None, 0, 1]
    serving.set_routing(routing)
    for t in (1, 16):  # the kernel, per-row BLAS
        x = torch.randn(4, t, 24)
        with torch.no_grad():
            torch.testing.assert_close(serving.model.q(x), want(x, routing), rtol=1e-5, atol=1e-5)
    x = torch.randn(4, 2, 24)
    torch.testing.assert_close(serving.model.q(x), want(x, routing), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        serving.set_routing([1] * 4)
        per_row = serving.model.q(x)
        serving.merge(1)
        serving.set_routing([1] * 4)
        torch.testing.assert_close(serving.model.q(x), per_row, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(per_row, want(x, [1] * 4), rtol=1e-5, atol=1e-5)


def test_factor_dtype_is_checked() -> None:
    with pytest.raises(ValueError, match="factor_dtype"):
        ServingPolicy(factor_dtype=torch.float16)


def test_capability_check_refuses_numbas_workqueue_pool(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Without an OpenMP/TBB runtime numba falls back to its "workqueue" pool, measured 10x
    slower per call: the kernel is then reported unavailable."""
    import numba

    from flora.serving.backends import numba_cpu as cpu_kernel

    monkeypatch.setattr(numba, "threading_layer", lambda: "workqueue")
    cpu_kernel.row_kernel.cache_clear()
    try:
        assert cpu_kernel.row_kernel() is None
    finally:
        monkeypatch.undo()
        cpu_kernel.row_kernel.cache_clear()
    assert cpu_kernel.row_kernel() is not None


def test_without_the_kernel_the_torch_paths_serve(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from flora.serving.backends import numba_cpu

    monkeypatch.setattr(numba_cpu, "kernel_for", lambda *args: None)
    torch.manual_seed(0)
    base = Proj()
    ref = Proj()
    ref.load_state_dict(base.state_dict())
    serving = ServingModel(base, max_slots=2)
    adapters = [linear_adapter(4, seed=0), linear_adapter(8, seed=1)]
    for slot, mods in enumerate(adapters):
        serving.load_modules(slot, mods)
    assert serving._wrapped["q"].bank.a.is_contiguous()  # not rank-major
    routing = [1, None, 0]
    serving.set_routing(routing)
    assert type(serving.routing.plans[0]).__name__ == "_WidePlan"
    x = torch.randn(3, 2, 24)
    with torch.no_grad():
        got = serving.model.q(x)
    slots = {k: a["q"] for k, a in enumerate(adapters)}
    torch.testing.assert_close(got, reference_forward(ref.q, x, routing, slots))
