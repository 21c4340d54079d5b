"""FloraConfig: validation, JSON round trip, matching, rank clamping, rank_pattern."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flora.config import FloraConfig, name_matches
from flora.fingerprint import ModuleSpec


def test_json_round_trip():
    cfg = FloraConfig(
        target_modules=["q_proj", "v_proj"],
        rank=4,
        kernel_rank=2,
        scale=4.0,
        dropout=0.1,
        rank_pattern={"layers.0.q_proj": [2, 3]},
        train_modules=["score"],
    )
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d == {
        "target_modules": ["q_proj", "v_proj"],
        "rank": 4,
        "kernel_rank": 2,
        "scale": 4.0,
        "dropout": 0.1,
        "rank_pattern": {"layers.0.q_proj": [2, 3]},
        "train_modules": ["score"],
    }
    assert FloraConfig.from_dict(d) == cfg
    regex = FloraConfig(target_modules=r".*\.(q|v)_proj")
    assert FloraConfig.from_dict(json.loads(json.dumps(regex.to_dict()))) == regex


def test_from_dict_names_unknown_keys():
    with pytest.raises(ValueError, match=r"alpha, lora_r"):
        FloraConfig.from_dict({"target_modules": ["q"], "alpha": 2, "lora_r": 3})
    with pytest.raises(ValueError, match="target_modules"):
        FloraConfig.from_dict({"rank": 3})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"rank": True}, "rank"),
        ({"kernel_rank": 0}, "kernel_rank"),
        ({"scale": float("nan")}, "scale"),
        ({"scale": float("inf")}, "scale"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": ""}, "target_modules"),
        ({"target_modules": "(q_proj"}, "target_modules"),
        ({"train_modules": "[bad"}, "train_modules"),
        ({"rank_pattern": {"q": [0, 2]}}, "rank_pattern"),
        ({"rank_pattern": {"q": []}}, "rank_pattern"),
    ],
)
def test_validation_names_the_field(kwargs, field):
    args = {"target_modules": ["q_proj"], **kwargs}
    with pytest.raises(ValueError, match=field):
        FloraConfig(**args)


def test_suffix_matching_is_on_whole_components():
    names = ["model.layers.0.self_attn.q_proj", "model.xq_proj", "q_proj", "q_proj.inner"]
    assert [name_matches(n, ["q_proj"]) for n in names] == [True, False, True, False]
    assert name_matches("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"])
    assert not name_matches("model.layers.0.self_attn.q_proj", ["attn.q_proj"])


def test_regex_must_fullmatch():
    cfg = FloraConfig(target_modules=r"model\.layers\.[01]\.self_attn\.(q|v)_proj")
    assert cfg.is_target("model.layers.1.self_attn.v_proj")
    assert not cfg.is_target("model.layers.2.self_attn.v_proj")
    assert not cfg.is_target("model.layers.1.self_attn.v_proj.base")  # no partial match
    assert not cfg.is_target("xmodel.layers.1.self_attn.v_proj")
    assert not FloraConfig(target_modules="q_proj").is_target("model.q_proj")


def test_regex_selections_run_in_linear_time_as_python_would_match_them():
    """Regex selections come with adapters (untrusted on a server): they run on RE2, so a
    pattern Python's `re` would backtrack on for minutes answers at once, in a process of
    its own so that a backtracking engine fails the test instead of hanging it; patterns
    RE2 cannot run in linear time are refused naming the field; ordinary ones select what
    `re.fullmatch` selects."""
    script = (
        "from flora.config import FloraConfig, name_matches\n"
        "name = 'model.layers.0.self_attn.' + 'q' * 40\n"
        "assert not name_matches(name, '(.*.*)*z')\n"
        "assert not FloraConfig(target_modules='(q*)*z').is_target(name)\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", script], cwd=root, timeout=30, check=True)
    for bad in (r"(?=model)model\..*", r"(q)_proj\1"):  # look-ahead, back-reference
        with pytest.raises(ValueError, match=r"target_modules .*linear time"):
            FloraConfig(target_modules=bad)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.10.mlp.down_proj", "lm_head"]
    for pattern in (r".*\.(q|v)_proj", r"model\.layers\.\d\..*", r"(?i)LM_head", r"[^.]+"):
        assert [name_matches(n, pattern) for n in names] == [
            re.fullmatch(pattern, n) is not None for n in names
        ], pattern


def test_train_modules_matching():
    cfg = FloraConfig(target_modules=["q"], train_modules=["classifier"])
    assert cfg.is_trained("model.classifier") and not cfg.is_trained("model.classifier2")
    assert not FloraConfig(target_modules=["q"]).is_trained("classifier")


def test_ranks_linear_and_clamping():
    cfg = FloraConfig(target_modules=["x"], rank=8)
    assert cfg.ranks_for("x", ModuleSpec("linear", (32, 16))) == (8, 8)
    assert cfg.ranks_for("x", ModuleSpec("linear", (32, 4))) == (8, 4)
    assert cfg.ranks_for("x", ModuleSpec("embedding", (100, 6))) == (8, 6)
    assert cfg.ranks_for("x", ModuleSpec("hf_conv1d", (5, 64))) == (5, 8)


def test_ranks_conv_kernel_and_depthwise():
    spec = ModuleSpec("conv2d", (64, 32, 3, 3))
    assert FloraConfig(["x"], rank=8).ranks_for("x", spec) == (8, 8, 3, 3)
    assert FloraConfig(["x"], rank=8, kernel_rank=2).ranks_for("x", spec) == (8, 8, 2, 2)
    pointwise = ModuleSpec("conv2d", (64, 32, 1, 1))
    assert FloraConfig(["x"], rank=8, kernel_rank=2).ranks_for("x", pointwise) == (8, 8, 1, 1)
    depthwise = ModuleSpec("conv2d", (96, 1, 3, 3), groups=96)
    assert FloraConfig(["x"], rank=8, kernel_rank=2).ranks_for("x", depthwise) == (8, 1, 2, 2)
    conv3d = ModuleSpec("conv3d", (6, 4, 1, 5, 3))
    assert FloraConfig(["x"], rank=16, kernel_rank=4).ranks_for("x", conv3d) == (6, 4, 1, 4, 3)


def test_rank_pattern_exact_then_longest_suffix():
    cfg = FloraConfig(
        ["proj"],
        rank=8,
        rank_pattern={"proj": [2, 2], "0.proj": [3, 3], "model.0.proj": [4, 5]},
    )
    spec = ModuleSpec("linear", (16, 16))
    assert cfg.ranks_for("model.0.proj", spec) == (4, 5)
    assert cfg.ranks_for("other.0.proj", spec) == (3, 3)
    assert cfg.ranks_for("model.1.proj", spec) == (2, 2)
    assert cfg.ranks_for("model.1.xproj", spec) == (8, 8)


def test_rank_pattern_errors():
    cfg = FloraConfig(["p"], rank_pattern={"p": [4, 20]})
    with pytest.raises(ValueError, match="exceeds"):
        cfg.ranks_for("m.p", ModuleSpec("linear", (16, 16)))
    cfg = FloraConfig(["p"], rank_pattern={"p": [4, 4, 4]})
    with pytest.raises(ValueError, match="3 ranks"):
        cfg.ranks_for("m.p", ModuleSpec("linear", (16, 16)))
