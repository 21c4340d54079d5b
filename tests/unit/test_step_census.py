"""`bench/step_census.py`: the kernels of one recorded decode step, counted on the CPU. The
counts of a llama-style decoder layer are pinned here: a change that adds a launch to every
layer (a fused kernel that stopped applying after a transformers upgrade, an adapter delta
back in a launch of its own) fails this test, where on the CPU it would change no output."""

from __future__ import annotations

import pytest
import torch

from bench.step_census import FUSED_MODULE, census, count_replay
from tests.unit.triton_modules import triton_modules


class _Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.w).view(2, 2, 4).transpose(0, 1)  # one GEMM; the views launch nothing
        return torch.empty_like(y).copy_(y) + 1.0  # an allocation (none), a copy, an add


def test_count_replay_counts_kernels_per_layer_not_views_or_allocations() -> None:
    layers = [_Layer(), _Layer()]
    x = torch.randn(4, 4)

    def replay() -> None:
        h = x * 2.0  # outside the layers
        for layer in layers:
            h = layer(h).reshape(4, 4)  # outside too: a copy (the output is transposed)
        h.reshape(16).sum()  # a view (contiguous), then a reduction

    counted = count_replay(layers, replay)  # type: ignore[arg-type]
    assert counted["layers"] == [{"mm": 1, "copy_": 1, "add": 1}] * 2  # matmul is an mm
    assert counted["outside"] == {"mul": 1, "clone": 2, "sum": 1}


@pytest.mark.timeout(300)
def test_a_recorded_decode_layer_launches_twelve_kernels_with_or_without_adapters(
    monkeypatch,
) -> None:  # type: ignore[no-untyped-def]
    """SmolLM2's widths, 4 rows each on its own rank-8 adapter on every projection: per
    layer four GEMMs (q/k/v in one, o, gate/up in one, down: ``addmm`` adding the deltas
    that the norms, SiLU-multiply and attention computed on the way), the two residual
    adds and six fused kernels; the base step the same count, the plain norms and
    SiLU-multiply in place of the prologues."""
    with triton_modules(monkeypatch, torch.device("cpu"), FUSED_MODULE):
        result = census(batch=4)
    fused = {"triton:paged_decode": 1, "triton:paged_write": 1, "triton:rope": 1, "add": 2}
    assert result["base"]["layer"] == {
        **fused, "mm": 4, "triton:rms_norm": 2, "triton:silu_and_mul": 1
    }  # fmt: skip
    assert result["adapters"]["layer"] == {
        **fused, "addmm": 4, "triton:norm_decode_group": 2, "triton:act_decode": 1
    }  # fmt: skip
    assert result["base"]["layer_kernels"] == result["adapters"]["layer_kernels"] == 12
    # outside the layers: the embedding, the rotary tables, the final norm, the LM head
    outside = result["base"]["outside"]
    assert outside["embedding"] == outside["triton:rms_norm"] == outside["mm"] == 1
    assert result["adapters"]["outside"] == outside


@pytest.mark.timeout(300)
def test_siblings_of_which_some_carry_adapters_keep_a_gemm_each(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Adapters on q and v only (PEFT's default targets): k runs its base layer and q/v
    their group's plans, whose weights are not one tensor (k's lies between), so q, k
    and v keep a GEMM each; gate/up, without adapters, still share one, and the MLP's
    norm and SiLU-multiply are the plain kernels."""
    with triton_modules(monkeypatch, torch.device("cpu"), FUSED_MODULE):
        result = census(batch=4, targets=["q_proj", "v_proj"])
    assert result["adapters"]["layer"] == {
        "triton:paged_decode": 1, "triton:paged_write": 1, "triton:rope": 1, "add": 2,
        "addmm": 2, "mm": 4, "triton:norm_decode_group": 1, "triton:rms_norm": 1,
        "triton:silu_and_mul": 1,
    }  # fmt: skip


@pytest.mark.timeout(300)
def test_switched_off_base_rows_take_a_gemm_per_projection(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`FusedKernels.sibling_gemms` off (what `bench/gpu_engine.py` races): the base step's
    seven projections launch seven GEMMs."""
    with triton_modules(monkeypatch, torch.device("cpu"), FUSED_MODULE):
        result = census(batch=4, sibling_gemms=False)
    assert result["base"]["layer"]["mm"] == 7 and result["base"]["layer_kernels"] == 15
