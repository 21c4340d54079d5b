"""Layer wrappers against an independent reference: functional forward with W + dW,
where dW comes from a torch.einsum written here (not flora.tucker)."""

from __future__ import annotations

import string

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import flora
from flora.errors import NonFiniteError
from flora.layers import FloraConv, FloraLayer


def einsum_delta(core: torch.Tensor, factors: list[torch.Tensor], scale: float) -> torch.Tensor:
    """dW[i, j, ..] = s * sum_{a, b, ..} G[a, b, ..] U_0[i, a] U_1[j, b] ..."""
    n = core.dim()
    ranks, dims = string.ascii_lowercase[:n], string.ascii_uppercase[:n]
    spec = ranks + "," + ",".join(d + r for d, r in zip(dims, ranks, strict=True)) + "->" + dims
    return scale * torch.einsum(spec, core, *factors)


def conv_ref(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
    padding = base.padding
    if base.padding_mode != "zeros":
        pads = [p for p in reversed(base.padding) for _ in range(2)]
        x, padding = F.pad(x, pads, mode=base.padding_mode), 0
    return conv(x, weight, base.bias, base.stride, padding, base.dilation, base.groups)


def functional(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The base module's forward with ``weight`` in place of its own."""
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, base.bias)
    if isinstance(base, nn.Embedding):
        return F.embedding(x, weight, base.padding_idx)
    if isinstance(base, Conv1D):
        return x @ weight + base.bias
    return conv_ref(base, x, weight)


# (id, module factory, input factory, rank, kernel_rank)
CASES = [
    ("linear", lambda: nn.Linear(12, 10), lambda: torch.randn(3, 5, 12), 4, None),
    (
        "conv1d",
        lambda: nn.Conv1d(6, 8, 3, stride=2, padding=1),
        lambda: torch.randn(2, 6, 11),
        3,
        2,
    ),
    (
        "conv2d",
        lambda: nn.Conv2d(6, 8, 3, padding=1, dilation=2, padding_mode="reflect"),
        lambda: torch.randn(2, 6, 9, 9),
        4,
        2,
    ),
    ("conv2d_g2", lambda: nn.Conv2d(6, 8, 3, groups=2), lambda: torch.randn(2, 6, 7, 7), 3, None),
    (
        "conv2d_dw",
        lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8),
        lambda: torch.randn(2, 8, 6, 6),
        4,
        None,
    ),
    ("conv3d", lambda: nn.Conv3d(4, 5, (2, 3, 3)), lambda: torch.randn(2, 4, 4, 5, 5), 3, 2),
    (
        "embedding",
        lambda: nn.Embedding(20, 7, padding_idx=0),
        lambda: torch.randint(0, 20, (3, 6)),
        4,
        None,
    ),
    ("hf_conv1d", lambda: Conv1D(9, 12), lambda: torch.randn(3, 4, 12), 4, None),
]


def make(case, seed: int = 0, direct: bool | None = None):
    _, factory, inputs, rank, kernel_rank = case
    torch.manual_seed(seed)
    base = factory()
    if isinstance(base, Conv1D):  # its bias starts at zero; make it count
        nn.init.normal_(base.bias)
    model = nn.Sequential()
    model.add_module("layer", base)
    flora.inject(model, flora.FloraConfig(["layer"], rank=rank, kernel_rank=kernel_rank))
    layer = model.layer
    with torch.no_grad():
        layer.core.normal_()
    if direct is not None:
        layer.use_direct = direct
    return model, layer, inputs()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_equals_functional_with_w_plus_dw(case):
    model, layer, x = make(case)
    assert layer.core.abs().min() > 0
    dw = einsum_delta(layer.core.detach(), [u.detach() for u in layer.factors], layer.scale)
    assert dw.shape == layer.base_layer.weight.shape
    torch.testing.assert_close(layer.delta_weight().detach(), dw, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        want = functional(layer.base_layer, x, layer.base_layer.weight + dw)
        got = model(x)
        base_only = functional(layer.base_layer, x, layer.base_layer.weight)
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, base_only) > 1e-3  # the adapter does change the output


@pytest.mark.parametrize("case", [c for c in CASES if c[0].startswith("conv")], ids=lambda c: c[0])
@pytest.mark.parametrize("direct", [False, True], ids=["three_conv", "direct"])
def test_both_conv_paths_match(case, direct):
    model, layer, x = make(case, direct=direct)
    dw = einsum_delta(layer.core.detach(), [u.detach() for u in layer.factors], layer.scale)
    with torch.no_grad():
        want = functional(layer.base_layer, x, layer.base_layer.weight + dw)
        assert rel_err(model(x), want) < 1e-5


def test_conv_path_choice():
    big = FloraConv(nn.Conv2d(64, 64, 3), ranks=(8, 8, 3, 3))
    depthwise = FloraConv(nn.Conv2d(64, 64, 3, groups=64), ranks=(8, 1, 3, 3))
    assert not big.use_direct and depthwise.use_direct


@pytest.mark.parametrize("case", [c for c in CASES if c[0].startswith("conv")], ids=lambda c: c[0])
def test_folded_conv_path_matches_and_trains_the_same(case):
    # the folded (LoRA-shaped) path: same output and same gradients as the three-conv form
    model, layer, x = make(case)
    dw = einsum_delta(layer.core.detach(), [u.detach() for u in layer.factors], layer.scale)
    grads = {}
    for path in ("folded", "three"):
        layer.path = path
        layer.zero_grad(set_to_none=True)
        out = model(x)
        if path == "folded":
            with torch.no_grad():
                want = functional(layer.base_layer, x, layer.base_layer.weight + dw)
            assert rel_err(out.detach(), want) < 1e-5
        out.square().sum().backward()
        grads[path] = [p.grad.clone() for p in layer.adapter_parameters()]
    for g_folded, g_three in zip(grads["folded"], grads["three"], strict=True):
        assert rel_err(g_folded, g_three) < 1e-4


def test_conv_paths_chosen_by_cost():
    pointwise = FloraConv(nn.Conv2d(96, 24, 1), ranks=(8, 8, 1, 1))
    stem = FloraConv(nn.Conv2d(3, 32, 3, stride=2), ranks=(8, 3, 3, 3))
    assert pointwise.path == "folded" and stem.path == "folded"
    assert FloraConv(nn.Conv2d(64, 64, 3), ranks=(8, 8, 3, 3)).path == "three"


@pytest.mark.parametrize("rows", [1, 2, 64])
def test_factored_matmul_orders_agree(rows):
    from flora.layers.linear import factored_matmul

    torch.manual_seed(0)
    x, u_in, core, u_out = (
        torch.randn(rows, 16),
        torch.randn(16, 4),
        torch.randn(3, 4),
        torch.randn(10, 3),
    )
    want = 0.5 * (x @ (u_out @ core @ u_in.T).T)
    torch.testing.assert_close(factored_matmul(x, u_in, core, u_out, 0.5), want)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_merged_forward_equals_unmerged(case):
    model, layer, x = make(case)
    with torch.no_grad():
        unmerged = model(x)
        flora.merge(model)
        assert layer.merged
        merged = model(x)
        flora.unmerge(model)
    assert rel_err(merged, unmerged) < 1e-5


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_delta_is_zero_at_init(case):
    torch.manual_seed(0)
    base = case[1]()
    x = case[2]()
    model = nn.Sequential()
    model.add_module("layer", base)
    with torch.no_grad():
        before = model(x)
    flora.inject(model, flora.FloraConfig(["layer"], rank=case[3], kernel_rank=case[4]))
    assert torch.count_nonzero(model.layer.delta_weight()) == 0
    assert all(u.abs().sum() > 0 for u in model.layer.factors)
    with torch.no_grad():
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_only_adapter_and_train_modules_get_grads(case):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("layer", case[1]())
    model.add_module("head", nn.Linear(4, 4))
    model.add_module("frozen", nn.Linear(4, 4))
    flora.inject(model, flora.FloraConfig(["layer"], rank=case[3], train_modules=["head"]))
    with torch.no_grad():
        model.layer.core.normal_()
    out = model.layer(case[2]())
    z = torch.randn(2, 4)
    (out.square().mean() + model.frozen(model.head(z)).sum()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    expected = {"layer.core"} | {f"layer.factors.{i}" for i in range(model.layer.core.dim())}
    assert with_grad == expected | {"head.weight", "head.bias"}
    assert all(model.layer.factors[i].grad.abs().sum() > 0 for i in range(model.layer.core.dim()))


@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[7]], ids=lambda c: c[0])
def test_thousand_merge_cycles_restore_base_bitwise(case):
    _model, layer, _x = make(case)
    original = layer.base_layer.weight.detach().clone()
    for _ in range(1000):
        layer.merge()
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)
    layer.merge()
    assert not torch.equal(layer.base_layer.weight, original)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)


def test_merge_is_idempotent():
    _model, layer, _ = make(CASES[0])
    layer.merge()
    once = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base_layer.weight, once)


def test_overflowing_merge_raises_and_changes_nothing():
    _model, layer, _ = make(CASES[0])
    original = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.core.fill_(1e38)
    with pytest.raises(NonFiniteError):
        layer.merge()
    assert not layer.merged
    assert torch.equal(layer.base_layer.weight, original)


def test_fp16_overflow_only_at_rounding_is_caught():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8)).half()
    flora.inject(model, flora.FloraConfig(["0"], rank=2))
    layer = model[0]
    with torch.no_grad():
        for u in layer.factors:
            u.fill_(1.0)
        layer.core.fill_(10000.0)  # dW = 2 * 2 * 10000 = 40000, finite in fp16
        layer.base_layer.weight.fill_(30000.0)  # W + dW = 70000 > fp16 max 65504
    assert layer.delta_weight().dtype == torch.float16
    assert torch.isfinite(layer.delta_weight()).all()
    original = layer.base_layer.weight.detach().clone()
    with pytest.raises(NonFiniteError):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, original)


def test_model_merge_is_all_or_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    flora.inject(model, flora.FloraConfig(["0", "1"], rank=2))
    originals = [m.base_layer.weight.detach().clone() for m in model]
    with torch.no_grad():
        model[0].core.normal_()
        model[1].core.fill_(1e38)
    with pytest.raises(NonFiniteError):
        flora.merge(model)
    assert not model[0].merged and not model[1].merged
    for m, w in zip(model, originals, strict=True):
        assert torch.equal(m.base_layer.weight, w)


def test_disabled_adapter_is_the_base():
    model, layer, x = make(CASES[0])
    with torch.no_grad():
        base = layer.base_layer(x)
        flora.set_enabled(model, False)
        assert torch.equal(model(x), base)
        flora.set_enabled(model, True)
        assert not torch.equal(model(x), base)


def test_lora_factors_reproduce_delta():
    for case in (CASES[0], CASES[7]):
        _, layer, _x = make(case)
        a, b = layer.lora_factors()
        dw = layer.delta_weight().detach()
        linear_dw = dw if case[0] == "linear" else dw.T  # Conv1D stores (in, out)
        assert a.shape[1] == linear_dw.shape[1] and b.shape[0] == linear_dw.shape[0]
        torch.testing.assert_close((b @ a).detach(), linear_dw, rtol=1e-5, atol=1e-6)


def test_wrappers_share_the_base_class_and_kinds():
    kinds = []
    for case in CASES:
        _, layer, _ = make(case)
        assert isinstance(layer, FloraLayer)
        kinds.append(layer.kind)
    assert kinds == [
        "linear",
        "conv1d",
        "conv2d",
        "conv2d",
        "conv2d",
        "conv3d",
        "embedding",
        "hf_conv1d",
    ]
