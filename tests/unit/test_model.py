"""inject / adapter_layers / merge / unmerge / eject over whole models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flora
from flora.layers import FloraConv, FloraEmbedding, FloraLinear


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8)}) for _ in range(2)
        )
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = h + layer["q_proj"](h) * torch.sigmoid(layer["v_proj"](h))
        return self.head(self.norm(h))


def test_inject_wraps_by_suffix_and_keeps_names():
    torch.manual_seed(0)
    model = Tiny()
    q0 = model.layers[0]["q_proj"]
    flora.inject(model, flora.FloraConfig(["q_proj", "embed"], rank=2))
    names = {n: type(m) for n, m in flora.adapter_layers(model)}
    assert names == {
        "embed": FloraEmbedding,
        "layers.0.q_proj": FloraLinear,
        "layers.1.q_proj": FloraLinear,
    }
    assert model.layers[0]["q_proj"].base_layer is q0
    assert model.layers[0]["q_proj"].ranks == (2, 2)
    assert flora.get_config(model).target_modules == ["q_proj", "embed"]


def test_inject_regex_and_freezing():
    torch.manual_seed(0)
    model = Tiny()
    flora.inject(model, flora.FloraConfig(r"layers\.1\.(q|v)_proj", rank=2, train_modules=["head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = {
        f"layers.1.{p}.{t}"
        for p in ("q_proj", "v_proj")
        for t in ("core", "factors.0", "factors.1")
    }
    assert trainable == adapter | {"head.weight", "head.bias"}


def test_inject_errors_leave_model_untouched():
    torch.manual_seed(0)
    model = Tiny()
    with pytest.raises(ValueError, match="nothing_here"):
        flora.inject(model, flora.FloraConfig(["nothing_here"]))
    with pytest.raises(ValueError, match="LayerNorm"):
        flora.inject(model, flora.FloraConfig(["q_proj", "norm"]))
    with pytest.raises(ValueError, match="train_modules"):
        flora.inject(model, flora.FloraConfig(["q_proj"], train_modules=["nope"]))
    assert list(flora.adapter_layers(model)) == []
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="not supported"):
        flora.inject(nn.Sequential(nn.Embedding(4, 4, max_norm=1.0)), flora.FloraConfig(["0"]))
    with pytest.raises(ValueError, match="not supported"):
        flora.inject(nn.Sequential(nn.ConvTranspose2d(2, 2, 3)), flora.FloraConfig(["0"]))
    flora.inject(model, flora.FloraConfig(["q_proj"]))
    with pytest.raises(ValueError, match="already"):
        flora.inject(model, flora.FloraConfig(["v_proj"]))


def test_model_merge_unmerge_eject():
    torch.manual_seed(0)
    model = Tiny()
    ids = torch.randint(0, 16, (2, 5))
    with torch.no_grad():
        base_out = model(ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flora.inject(model, flora.FloraConfig(["q_proj", "v_proj", "embed"], rank=3))
    with torch.no_grad():
        for _, layer in flora.adapter_layers(model):
            layer.core.normal_(std=0.1)
        adapted = model(ids)
        flora.merge(model)
        assert all(layer.merged for _, layer in flora.adapter_layers(model))
        merged = model(ids)
        flora.unmerge(model)
    assert (adapted - base_out).abs().max() > 1e-3
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    flora.merge(model)
    flora.eject(model)  # unmerges first
    assert list(flora.adapter_layers(model)) == []
    assert flora.get_config(model) is None
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(model(ids), base_out)


def test_conv_model_with_depthwise_and_pointwise():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Conv2d(8, 4, 1),
    )
    flora.inject(model, flora.FloraConfig(r"\d", rank=4, kernel_rank=2))
    ranks = {n: layer.ranks for n, layer in flora.adapter_layers(model)}
    assert ranks == {"0": (4, 3, 2, 2), "1": (4, 1, 2, 2), "2": (4, 4, 1, 1)}
    assert all(isinstance(m, FloraConv) for m in model)


def test_merge_refuses_tied_weights():
    torch.manual_seed(0)
    model = nn.Module()
    model.embed = nn.Embedding(10, 4)
    model.lm_head = nn.Linear(4, 10, bias=False)
    model.lm_head.weight = model.embed.weight
    flora.inject(model, flora.FloraConfig(["embed"], rank=2))
    with torch.no_grad():
        model.embed.core.normal_()
    before = model.lm_head.weight.detach().clone()
    with pytest.raises(ValueError, match=r"tied to embed\.base_layer\.weight, lm_head\.weight"):
        flora.merge(model)
    assert not model.embed.merged
    assert torch.equal(model.lm_head.weight, before)
