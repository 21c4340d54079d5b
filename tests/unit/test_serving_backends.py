"""flora.serving.backends.select: one seam for the per-row kernels (numba, Triton, torch)."""

from __future__ import annotations

import pytest
import torch

from flora.serving import ServingModel, ServingPolicy
from flora.serving import backends as be
from flora.serving.backends.numba_cpu import NumbaBackend
from flora.serving.backends.torch_paths import TorchBackend
from flora.serving.base import Plan
from tests.unit.test_cpu_kernel import Proj, linear_adapter

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_select_takes_the_first_backend_that_loads() -> None:
    policy = ServingPolicy()
    assert type(be.select(policy, CPU, torch.float32)) is NumbaBackend
    assert type(be.select(ServingPolicy(cpu_kernel=False), CPU, torch.float32)) is TorchBackend
    assert type(be.select(policy, CPU, torch.float64)) is TorchBackend  # numba: float32 only
    no_kernels = ServingPolicy(cpu_kernel=False, gpu_kernel=False)
    assert type(be.select(no_kernels, CUDA, torch.float16)) is TorchBackend
    assert be.BACKENDS[-1] is TorchBackend  # serves everything, so it stays last


def test_bank_layout_and_factor_dtype_come_from_the_backend() -> None:
    bf16 = ServingPolicy(factor_dtype=torch.bfloat16)
    numba = be.select(bf16, CPU, torch.float32)
    assert numba.rank_major and numba.factor_dtype(bf16, torch.float32) == torch.bfloat16
    torch_paths = be.select(
        ServingPolicy(cpu_kernel=False, factor_dtype=torch.bfloat16), CPU, torch.float32
    )
    assert not torch_paths.rank_major
    assert torch_paths.factor_dtype(bf16, torch.float32) == torch.float32


def test_a_new_backend_is_one_class_and_one_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend put first in BACKENDS serves every per-row routing of a ServingModel:
    here one that adds twice the torch path's update, so its output is recognisable."""

    class Doubled(TorchBackend):
        name = "doubled"

        def build_plan(self, target: be.RowTarget, rows: list[int]) -> Plan:
            update = super().build_plan(target, rows)

            def plan(x: torch.Tensor) -> torch.Tensor:
                base = target.base_forward(x)
                return base + 2 * (update(x) - base)

            return plan

    torch.manual_seed(0)
    base = Proj()
    plain = ServingModel(Proj(), max_slots=1, policy=ServingPolicy(cpu_kernel=False))
    plain.model.load_state_dict(base.state_dict())
    adapter = linear_adapter(4, seed=0)
    plain.load_modules(0, adapter)  # modules are wrapped (and their backend picked) here
    monkeypatch.setattr(be, "BACKENDS", [Doubled, *be.BACKENDS])
    doubled = ServingModel(base, max_slots=1)
    doubled.load_modules(0, adapter)
    for serving in (plain, doubled):
        serving.set_routing([0, None])
    assert type(plain._wrapped["q"].backend) is TorchBackend
    assert type(doubled._wrapped["q"].backend) is Doubled
    x = torch.randn(2, 3, 24)
    with torch.no_grad():
        y_base, y_plain, y_doubled = base.q.base_layer(x), plain.model.q(x), doubled.model.q(x)
    torch.testing.assert_close(y_doubled - y_base, 2 * (y_plain - y_base))
    torch.testing.assert_close(y_doubled[1], y_base[1])  # the base row is left alone
    assert not torch.allclose(y_plain[0], y_base[0])
