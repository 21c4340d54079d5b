"""`flora.serving.siblings`: sibling projections' weights as consecutive row blocks of one
tensor, so one GEMM computes them all."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flora import FloraConfig
from flora.serving import ServingModel, ServingPolicy
from flora.serving.siblings import concatenated, joint_of, share_storage
from tests.unit.test_serving_llama import make_adapter


def qkv(bias: bool = False) -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(16, n, bias=bias) for n in (16, 8, 8)]


def test_shared_weights_keep_their_values_and_one_gemm_gives_each_output() -> None:
    linears = qkv()
    before = [lin.weight.detach().clone() for lin in linears]
    x = torch.randn(5, 16)
    want = [lin(x) for lin in linears]
    joint = share_storage(linears)
    assert joint is not None and joint.weight.shape == (32, 16)
    assert joint.columns == [(0, 16), (16, 24), (24, 32)]
    for lin, old in zip(linears, before, strict=True):
        assert torch.equal(lin.weight, old) and isinstance(lin.weight, nn.Parameter)
    out = F.linear(x, joint.weight)
    for (first, end), lin, w in zip(joint.columns, linears, want, strict=True):
        torch.testing.assert_close(out[:, first:end], w)
        torch.testing.assert_close(lin(x), w)
    # the weights are views: a write through a module is a write into the shared tensor
    with torch.no_grad():
        linears[1].weight.add_(1.0)
    assert torch.equal(joint.weight[16:24], before[1] + 1.0)
    # any order of the same weights names each one's columns; a second call moves nothing
    found = concatenated([linears[2].weight, linears[0].weight, linears[1].weight])
    assert found is not None and found.columns == [(24, 32), (0, 16), (16, 24)]
    again = share_storage(linears)
    assert again is not None and again.weight.data_ptr() == joint.weight.data_ptr()


def test_biases_are_shared_with_their_weights() -> None:
    """Qwen2's q/k/v carry biases: they become one tensor too, in the weights' order, and
    one GEMM with the shared bias gives each module's output."""
    linears = qkv(bias=True)
    x = torch.randn(5, 16)
    want = [lin(x) for lin in linears]
    joint = share_storage(linears)
    assert joint is not None and joint.bias is not None and joint.bias.shape == (32,)
    out = F.linear(x, joint.weight, joint.bias)
    for (first, end), w in zip(joint.columns, want, strict=True):
        torch.testing.assert_close(out[:, first:end], w)
    with torch.no_grad():
        linears[2].bias.add_(1.0)  # a view too
    assert torch.equal(joint.bias[24:], linears[2].bias)
    order = [linears[2], linears[0], linears[1]]
    found = concatenated([lin.weight for lin in order], [lin.bias for lin in order])
    assert found is not None and found.columns == [(24, 32), (0, 16), (16, 24)]
    # biases out of the weights' order, or re-bound, are not the weights' blocks
    swapped = [linears[1].bias, linears[0].bias, linears[2].bias]
    assert concatenated([lin.weight for lin in linears], swapped) is None
    linears[0].bias.data = linears[0].bias.data.clone()
    assert concatenated([lin.weight for lin in linears], [lin.bias for lin in linears]) is None


def test_what_is_not_one_tensor_is_left_as_it_is() -> None:
    mixed = [*qkv(bias=True)[:2], qkv()[2]]  # a bias on some only
    ptrs = [lin.weight.data_ptr() for lin in mixed]
    assert share_storage(mixed) is None
    assert [lin.weight.data_ptr() for lin in mixed] == ptrs
    biased = qkv(bias=True)
    assert share_storage(biased) is not None and joint_of(biased) is not None
    biased[1].bias = None  # one sibling loses its bias: the shared GEMM would add a wrong one
    assert joint_of(biased) is None
    assert share_storage([nn.Linear(16, 4, bias=False), nn.Linear(8, 4, bias=False)]) is None
    assert share_storage([nn.Linear(16, 4, bias=False)]) is None
    assert share_storage(qkv()[:1]) is None
    linears = qkv()
    assert share_storage(linears) is not None
    # a weight re-bound since (a copy, a `.to()`) is no longer one of the blocks
    assert concatenated([lin.weight for lin in linears[:2]]) is not None
    linears[1].weight.data = linears[1].weight.data.clone()
    assert concatenated([lin.weight for lin in linears]) is None
    # q and v without k between them are not consecutive
    fresh = qkv()
    share_storage(fresh)
    assert concatenated([fresh[0].weight, fresh[2].weight]) is None
    assert concatenated([fresh[0].weight.double(), fresh[1].weight.double()]) is None


def test_shared_inside_inference_mode_then_merged_and_restored_outside_it() -> None:
    """An adapter merged into a projection writes the shared tensor in place (outside
    inference mode: the tensor must not be an inference tensor, whatever mode shared
    it), and unmerging restores the base bitwise; the blocks stay one tensor."""
    from tests.unit.server.tiny_engine import make_tiny_llama

    model = make_tiny_llama()
    attention = model.model.layers[0].self_attn
    linears = [attention.q_proj, attention.k_proj, attention.v_proj]
    with torch.inference_mode():
        joint = share_storage(linears)
    assert joint is not None and not joint.weight.is_inference()
    base = joint.weight.clone()
    adapter = make_adapter(model, FloraConfig(target_modules=["q_proj", "v_proj"], rank=4), 1)
    serving = ServingModel(model, max_slots=1, policy=ServingPolicy(cpu_kernel=False))
    serving.load(0, adapter)
    x = torch.randn(3, 64)
    serving.set_routing([0, 0, 0])
    with torch.no_grad():
        want = [attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)]
    serving.merge(0)
    serving.set_routing([0, 0, 0])
    with torch.no_grad():
        merged = F.linear(x, joint.weight)
    for (first, end), w in zip(joint.columns, want, strict=True):
        torch.testing.assert_close(merged[:, first:end], w, rtol=1e-5, atol=1e-5)
    assert not torch.equal(joint.weight, base)
    serving.unmerge()
    assert torch.equal(joint.weight, base)
    assert concatenated([lin.weight for lin in linears]) is not None
