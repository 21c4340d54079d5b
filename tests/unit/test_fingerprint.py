"""ModuleSpec, describe_base and base_fingerprint."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import flora
from flora.fingerprint import ModuleSpec, base_fingerprint, describe_base


def tiny() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    m.emb = nn.Embedding(10, 4)
    m.conv = nn.Conv2d(4, 4, 3, groups=2)
    m.block = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), Conv1D(5, 6))
    m.norm_emb = nn.Embedding(10, 4, max_norm=1.0)  # not adaptable
    m.register_buffer("steps", torch.tensor([3], dtype=torch.int64))
    return m


def test_module_spec_round_trip_and_validation():
    spec = ModuleSpec("conv2d", (8, 1, 3, 3), groups=8)
    assert spec.to_dict() == {"kind": "conv2d", "weight_shape": [8, 1, 3, 3], "groups": 8}
    assert ModuleSpec.from_dict(spec.to_dict()) == spec
    assert ModuleSpec.from_dict({"kind": "linear", "weight_shape": [3, 2]}).groups == 1
    for bad in (
        {"kind": "lstm", "weight_shape": [3, 2]},
        {"kind": "linear", "weight_shape": [3, 2, 1]},
        {"kind": "linear", "weight_shape": [3, 0]},
        {"kind": "linear", "weight_shape": [3, 2], "groups": 2},
        {"kind": "linear"},
    ):
        with pytest.raises(ValueError):
            ModuleSpec.from_dict(bad)


def test_describe_base_plain_and_injected():
    model = tiny()
    want = {
        "emb": ModuleSpec("embedding", (10, 4)),
        "conv": ModuleSpec("conv2d", (4, 2, 3, 3), groups=2),
        "block.0": ModuleSpec("linear", (6, 4)),
        "block.2": ModuleSpec("hf_conv1d", (6, 5)),
    }
    assert describe_base(model) == want
    flora.inject(model, flora.FloraConfig(["emb", "conv", "0", "2"], rank=2))
    assert describe_base(model) == want


def reference_hash(sd: dict[str, torch.Tensor]) -> str:
    """Independent re-statement of the documented byte layout."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name]
        for f in (name, str(tuple(t.shape)), str(t.dtype)):
            h.update(len(f.encode()).to_bytes(8, "little") + f.encode())
        raw = t.detach().cpu().contiguous().numpy().tobytes()
        h.update(len(raw).to_bytes(8, "little") + raw)
    return "sha256:" + h.hexdigest()


def test_fingerprint_value_and_sensitivity():
    model = tiny()
    fp = base_fingerprint(model)
    assert fp == reference_hash(model.state_dict())
    assert fp == base_fingerprint(model.state_dict())
    with torch.no_grad():
        model.block[0].weight[1, 2] += 1e-3
    assert base_fingerprint(model) != fp
    with torch.no_grad():
        model.block[0].weight[1, 2] -= 1e-3
    sd = dict(model.state_dict())
    assert base_fingerprint(sd) == reference_hash(sd)
    sd["steps"] = sd["steps"].to(torch.int32)  # same value, other dtype
    assert base_fingerprint(sd) != base_fingerprint(model.state_dict())
    sd2 = dict(model.state_dict())
    sd2["emb.weight"] = sd2["emb.weight"].reshape(4, 10)  # same bytes, other shape
    assert base_fingerprint(sd2) != base_fingerprint(model.state_dict())


def test_fingerprint_of_injected_and_merged_model_equals_base():
    model = tiny()
    fp = base_fingerprint(model)
    flora.inject(model, flora.FloraConfig(["emb", "conv", "0", "2"], rank=2))
    with torch.no_grad():
        for _, layer in flora.adapter_layers(model):
            layer.core.normal_()
    assert base_fingerprint(model) == fp
    flora.merge(model)
    assert base_fingerprint(model) == fp
    flora.unmerge(model)
    assert base_fingerprint(model) == fp
