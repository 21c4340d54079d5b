"""`flora.merging`: merged adapters against plain references computed on dense updates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flora
from flora.adapter.io import adapter_from_model
from flora.errors import AdapterError
from flora.merging import merge_adapters
from flora.tucker import reconstruct


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 5)
        self.conv = nn.Conv2d(4, 3, 3)


def _adapter(seed: int, targets: list[str], rank: int = 3, scale: float = 1.0):
    torch.manual_seed(100)
    model = Tiny()
    flora.inject(model, flora.FloraConfig(target_modules=targets, rank=rank, scale=scale))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in flora.adapter_layers(model):
            layer.core.copy_(torch.randn(layer.core.shape, generator=gen))
            for u in layer.factors:
                u.copy_(torch.randn(u.shape, generator=gen))
    return adapter_from_model(model, "tiny")


def _delta(adapter, name: str) -> torch.Tensor:
    if name not in adapter.modules:
        return torch.zeros(adapter.modules[next(iter(adapter.modules))].spec.weight_shape)
    core = adapter.core(name).double()
    return reconstruct(core, [u.double() for u in adapter.factors(name)], adapter.config.scale)


def test_linear_merge_is_the_weighted_sum_of_dense_updates_linear_and_conv() -> None:
    a = _adapter(1, ["proj", "conv"], scale=2.0)
    b = _adapter(2, ["proj", "conv"], scale=0.5)
    c = _adapter(3, ["proj"])  # conv absent: counts as a zero update
    weights = [0.7, -1.3, 0.4]
    merged = merge_adapters([a, b, c], weights)
    for name in ("proj", "conv"):
        want = sum(
            w * _delta(x, name)
            for x, w in zip((a, b, c), weights, strict=True)
            if name in x.modules
        )
        got = _delta(merged, name)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # proj: 3 + 3 + 3 = 9 > 6 inputs and > 5 outputs: compressed exactly to the mode sizes.
    assert merged.modules["proj"].ranks == (5, 6)
    assert merged.fingerprint == a.fingerprint


def _ties_reference(deltas, weights, density, method):
    """TIES written out entry by entry (Yadav et al. 2023, PEFT's merge_utils.ties)."""
    k = int(density * deltas[0].numel())
    trimmed = []
    for d in deltas:
        flat = d.flatten()
        order = sorted(range(flat.numel()), key=lambda i: -abs(float(flat[i])))[:k]
        kept = torch.zeros_like(flat)
        kept[order] = flat[order]
        trimmed.append(kept)
    out = torch.zeros_like(trimmed[0])
    for i in range(out.numel()):
        vals = [float(t[i]) for t in trimmed]
        if method == "total":
            elected = 1.0 if sum(vals) >= 0 else -1.0
        else:
            elected = 1.0 if sum((v > 0) - (v < 0) for v in vals) >= 0 else -1.0
        agree = [
            (w * v)
            for v, w in zip(vals, weights, strict=True)
            if v != 0 and (v > 0) == (elected > 0)
        ]
        out[i] = sum(agree) / max(len(agree), 1)
    return out.reshape(deltas[0].shape)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_merge_matches_an_entrywise_reference(method: str) -> None:
    a, b = _adapter(4, ["proj"]), _adapter(5, ["proj"])
    weights = [1.0, 0.6]
    # rank budget 3 + 3 = 6 >= min(5, 6): the SVD keeps the merged matrix exactly
    merged = merge_adapters(
        [a, b], weights, strategy="ties", density=0.5, majority_sign_method=method
    )
    want = _ties_reference([_delta(a, "proj"), _delta(b, "proj")], weights, 0.5, method)
    torch.testing.assert_close(_delta(merged, "proj"), want, rtol=1e-5, atol=1e-5)


def test_dare_linear_is_reproducible_and_unbiased_at_density_one() -> None:
    a, b = _adapter(6, ["proj"]), _adapter(7, ["proj"])
    one = merge_adapters([a, b], [0.5, 0.5], strategy="dare_linear", density=1.0)
    want = 0.5 * _delta(a, "proj") + 0.5 * _delta(b, "proj")
    torch.testing.assert_close(_delta(one, "proj"), want, rtol=1e-5, atol=1e-5)
    x = merge_adapters([a, b], [0.5, 0.5], strategy="dare_linear", density=0.5, seed=3)
    y = merge_adapters([a, b], [0.5, 0.5], strategy="dare_linear", density=0.5, seed=3)
    assert torch.equal(_delta(x, "proj"), _delta(y, "proj"))
    assert not torch.allclose(_delta(x, "proj"), want)  # entries were dropped and rescaled
    # every entry is 0.5 * (kept_a * a / 0.5 + kept_b * b / 0.5): one of four values
    da, db, got = _delta(a, "proj"), _delta(b, "proj"), _delta(x, "proj")
    options = torch.stack([0 * da, da, db, da + db])
    assert bool(((options - got).abs().min(0).values < 1e-5).all())


def test_ties_refuses_conv_and_rank_limits_are_checked() -> None:
    a, b = _adapter(8, ["conv"]), _adapter(9, ["conv"])
    with pytest.raises(AdapterError, match="2-mode"):
        merge_adapters([a, b], [1, 1], strategy="ties")
    with pytest.raises(AdapterError, match="exceed 2"):
        merge_adapters([a, b], [1, 1], max_rank=2)
