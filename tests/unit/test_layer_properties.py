"""Property: for random shapes, groups, kernels and ranks, the wrapped forward equals the
base forward with W + dW, dW built by an einsum written here."""

from __future__ import annotations

import string

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import flora

PROPS = settings(max_examples=25, deadline=None, derandomize=True)


def einsum_delta(core: torch.Tensor, factors: list[torch.Tensor], scale: float) -> torch.Tensor:
    n = core.dim()
    ranks, dims = string.ascii_lowercase[:n], string.ascii_uppercase[:n]
    spec = ranks + "," + ",".join(d + r for d, r in zip(dims, ranks, strict=True)) + "->" + dims
    return scale * torch.einsum(spec, core, *factors)


def wrap(base: nn.Module, ranks: list[int], scale: float) -> tuple[nn.Module, nn.Module]:
    model = nn.Sequential()
    model.add_module("m", base)
    cfg = flora.FloraConfig(["m"], scale=scale, rank_pattern={"m": ranks})
    flora.inject(model, cfg)
    with torch.no_grad():
        model.m.core.normal_()
    return model, model.m


def draw_ranks(draw, shape) -> list[int]:
    return [draw(st.integers(1, d)) for d in shape]


def assert_close_rel(got: torch.Tensor, want: torch.Tensor) -> None:
    err = float((got - want).norm() / want.norm().clamp_min(1e-12))
    assert err < 1e-5, err


@st.composite
def conv_cases(draw):
    nd = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 3]))
    depthwise = draw(st.booleans())
    in_per_group = 1 if depthwise else draw(st.integers(1, 3))
    out_per_group = draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 1))
    mode = draw(st.sampled_from(["zeros", "reflect", "circular"])) if padding else "zeros"
    conv_cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
    base = conv_cls(
        groups * in_per_group,
        groups * out_per_group,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=mode,
        bias=draw(st.booleans()),
    )
    spatial = tuple(dilation * (k - 1) + 1 + draw(st.integers(0, 3)) for k in kernel)
    ranks = draw_ranks(draw, base.weight.shape)
    return base, spatial, ranks, draw(st.booleans()), draw(st.sampled_from([0.5, 1.0, 4.0]))


def conv_ref(base, x, weight):
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
    padding = base.padding
    if base.padding_mode != "zeros":
        pads = [p for p in reversed(base.padding) for _ in range(2)]
        x, padding = F.pad(x, pads, mode=base.padding_mode), 0
    return conv(x, weight, base.bias, base.stride, padding, base.dilation, base.groups)


@PROPS
@given(conv_cases(), st.integers(0, 2**16))
def test_conv_forward_equals_w_plus_dw(case, seed):
    base, spatial, ranks, direct, scale = case
    torch.manual_seed(seed)
    model, layer = wrap(base, ranks, scale)
    layer.use_direct = direct
    x = torch.randn(2, base.in_channels, *spatial)
    dw = einsum_delta(layer.core.detach(), [u.detach() for u in layer.factors], scale)
    with torch.no_grad():
        assert_close_rel(model(x), conv_ref(base, x, base.weight + dw))


@PROPS
@given(
    st.sampled_from(["linear", "embedding", "hf_conv1d"]),
    st.integers(1, 12),
    st.integers(1, 12),
    st.data(),
)
def test_matrix_layers_forward_equals_w_plus_dw(kind, a, b, data):
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    base = {"linear": nn.Linear, "embedding": nn.Embedding, "hf_conv1d": Conv1D}[kind](a, b)
    ranks = [data.draw(st.integers(1, d)) for d in base.weight.shape]
    model, layer = wrap(base, ranks, 2.0)
    dw = einsum_delta(layer.core.detach(), [u.detach() for u in layer.factors], 2.0)
    w = base.weight + dw
    with torch.no_grad():
        if kind == "embedding":
            x = torch.randint(0, a, (3, 4))
            want = F.embedding(x, w)
        elif kind == "linear":
            x = torch.randn(3, a)
            want = F.linear(x, w, base.bias)
        else:
            x = torch.randn(3, b)
            want = x @ w + base.bias
        assert_close_rel(model(x), want)
