"""flora.kinds: one table says which modules are adaptable and as what; the training
wrappers, the served wrappers and the fingerprint all read it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import flora
from flora.fingerprint import describe_base
from flora.kinds import is_hf_conv1d, is_linear, module_kind
from flora.layers import FloraConv, FloraEmbedding, FloraHFConv1D, FloraLinear, wrapper_for
from flora.serving.model import _wrapper_for


class NotConv1D(nn.Module):
    """Looks like transformers' Conv1D by name and attributes, is not one."""

    def __init__(self) -> None:
        super().__init__()
        self.nf = 4
        self.weight = nn.Parameter(torch.zeros(3, 4))


NotConv1D.__name__ = "Conv1D"


@pytest.mark.parametrize(
    ("module", "kind", "wrapper"),
    [
        (nn.Linear(3, 4), "linear", FloraLinear),
        (nn.Conv1d(2, 4, 3), "conv1d", FloraConv),
        (nn.Conv2d(2, 4, 3, groups=2), "conv2d", FloraConv),
        (nn.Conv3d(2, 4, 1), "conv3d", FloraConv),
        (nn.Embedding(10, 4), "embedding", FloraEmbedding),
        (Conv1D(4, 3), "hf_conv1d", FloraHFConv1D),
        (nn.Embedding(10, 4, max_norm=1.0), None, None),  # renormalised on every lookup
        (NotConv1D(), None, None),  # recognised by class, not by name
        (nn.LayerNorm(4), None, None),
    ],
)
def test_one_table_for_kinds_and_wrappers(module, kind, wrapper) -> None:
    assert module_kind(module) == kind
    assert wrapper_for(module) is wrapper
    model = nn.Sequential(module)
    assert {n: s.kind for n, s in describe_base(model).items()} == ({"0": kind} if kind else {})


def test_served_wrappers_agree_with_the_training_wrappers() -> None:
    assert is_hf_conv1d(Conv1D(4, 3)) and is_linear(Conv1D(4, 3))
    assert not is_hf_conv1d(NotConv1D())
    # The served registry refuses what inject refuses (it used to wrap max_norm embeddings).
    with pytest.raises(ValueError, match="no served wrapper"):
        _wrapper_for(nn.Embedding(10, 4, max_norm=1.0))
    assert _wrapper_for(nn.Embedding(10, 4)).__name__ == "ServedEmbedding"
    assert _wrapper_for(Conv1D(4, 3)).__name__ == "ServedLinear"
    with pytest.raises(ValueError, match="type Embedding is not supported"):
        flora.inject(
            nn.Sequential(nn.Embedding(10, 4, max_norm=1.0)), flora.FloraConfig(["0"], rank=2)
        )
