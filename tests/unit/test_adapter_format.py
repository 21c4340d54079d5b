"""Adapter format v1: bitwise round trips, both forms, apply/remove, digests."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import flora
from flora.adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Adapter,
    adapter_sha256,
    apply_adapter,
    load_adapter,
    load_adapter_bytes,
    load_archive_bytes,
    remove_adapter,
    save_adapter,
)


class Toy(nn.Module):
    """Linear, grouped conv and a head that is trained fully."""

    def __init__(self, num_labels: int = 3) -> None:
        super().__init__()
        self.a = nn.Linear(8, 6)
        self.c = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.head = nn.Linear(6, num_labels)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.a(x)), self.c(img)


def trained_toy(num_labels: int = 3) -> tuple[nn.Module, nn.Module]:
    """(injected model with non-zero adapter and changed head, pristine copy of its base)."""
    torch.manual_seed(0)
    base = Toy()
    model = Toy()
    model.load_state_dict(base.state_dict())
    if num_labels != 3:
        model.head = nn.Linear(6, num_labels)
    cfg = flora.FloraConfig(
        target_modules=["a", "c"], rank=2, kernel_rank=2, scale=0.5, train_modules=["head"]
    )
    flora.inject(model, cfg)
    with torch.no_grad():
        for _, layer in flora.adapter_layers(model):
            layer.core.normal_()
        model.head.weight.add_(1.0)
    return model, base


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 8, generator=g), torch.randn(1, 4, 5, 5, generator=g)


@pytest.mark.parametrize("form", ["dir", "archive", "flora_suffix"])
def test_round_trip_is_bitwise(tmp_path: Path, form: str) -> None:
    model, _ = trained_toy()
    path = tmp_path / ("ad.flora" if form == "flora_suffix" else "ad")
    save_adapter(
        model,
        path,
        "toy-base",
        task="classify",
        labels=["x", "y", "z"],
        archive=form == "archive",
        note="hi",
    )
    if form == "dir":
        assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    else:
        assert path.is_file()
    loaded = load_adapter(path)
    layers = dict(flora.adapter_layers(model))
    expected = {f"flora.{n}.core": layer.core for n, layer in layers.items()}
    for n, layer in layers.items():
        expected |= {f"flora.{n}.factor.{m}": u for m, u in enumerate(layer.factors)}
    expected |= {f"full.head.{k}": v for k, v in model.head.state_dict().items()}
    assert sorted(loaded.tensors) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(loaded.tensors[key], value.detach()), key
    assert loaded.config == flora.get_config(model)
    assert loaded.fingerprint is not None and loaded.fingerprint.startswith("sha256:")
    assert (loaded.base_model_id, loaded.task, loaded.labels) == (
        "toy-base",
        "classify",
        ["x", "y", "z"],
    )
    assert loaded.metadata == {"note": "hi"}
    assert loaded.modules["c"].spec == flora.ModuleSpec("conv2d", (6, 2, 3, 3), groups=2)
    assert loaded.modules["c"].ranks == (2, 2, 2, 2)
    assert loaded.modules["a"].ranks == (2, 2)


def test_directory_layout_matches_the_contract(tmp_path: Path) -> None:
    model, _ = trained_toy()
    save_adapter(model, tmp_path, "toy-base")
    doc = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert set(doc) == {
        "format_version",
        "method",
        "config",
        "base_model",
        "modules",
        "task",
        "labels",
        "created_at",
        "library_version",
        "metadata",
        "tensors_sha256",
    }
    assert doc["format_version"] == 1 and doc["method"] == "flora"
    assert doc["modules"]["a"] == {
        "kind": "linear",
        "weight_shape": [6, 8],
        "groups": 1,
        "ranks": [2, 2],
    }
    assert doc["config"]["scale"] == 0.5
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert tensors["flora.c.core"].shape == (2, 2, 2, 2)
    assert tensors["flora.c.factor.1"].shape == (2, 2)  # in/groups = 2
    assert tensors["flora.a.factor.0"].shape == (6, 2)
    assert tensors["full.head.bias"].shape == (3,)


def test_fingerprint_is_the_bases_without_trained_modules(tmp_path: Path) -> None:
    model, base = trained_toy()
    save_adapter(model, tmp_path, "toy-base")
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("head.")}
    assert load_adapter(tmp_path).fingerprint == flora.base_fingerprint(state)


def test_apply_reproduces_outputs_and_remove_restores_base(tmp_path: Path) -> None:
    model, base = trained_toy()
    x, img = inputs()
    want = model(x, img)
    before = base(x, img)
    state_before = {k: v.clone() for k, v in base.state_dict().items()}
    save_adapter(model, tmp_path / "ad.flora", "toy-base")
    apply_adapter(base, load_adapter(tmp_path / "ad.flora"))
    got = base(x, img)
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w, g)
    assert not torch.equal(got[0], before[0])
    remove_adapter(base)
    assert type(base.a) is nn.Linear and type(base.c) is nn.Conv2d
    for w, g in zip(before, base(x, img), strict=True):
        assert torch.equal(w, g)
    assert all(torch.equal(v, state_before[k]) for k, v in base.state_dict().items())
    assert all(p.requires_grad for p in base.parameters())


def test_head_of_another_size_is_replaced_and_restored(tmp_path: Path) -> None:
    model, base = trained_toy(num_labels=5)
    x, img = inputs()
    save_adapter(model, tmp_path, "toy-base")
    apply_adapter(base, load_adapter(tmp_path))
    assert base.head.out_features == 5
    assert torch.equal(base(x, img)[0], model(x, img)[0])
    remove_adapter(base)
    assert base.head.out_features == 3 and base(x, img)[0].shape == (2, 3)


def test_bytes_entry_points_match_files(tmp_path: Path) -> None:
    model, _ = trained_toy()
    save_adapter(model, tmp_path / "d", "toy-base")
    save_adapter(model, tmp_path / "a.flora", "toy-base")
    from_dir = load_adapter_bytes(
        (tmp_path / "d" / CONFIG_NAME).read_bytes(), (tmp_path / "d" / WEIGHTS_NAME).read_bytes()
    )
    archive = (tmp_path / "a.flora").read_bytes()
    from_bytes = load_adapter(archive)
    assert adapter_sha256(from_dir) == adapter_sha256(from_bytes)
    assert adapter_sha256(load_archive_bytes(archive)) == adapter_sha256(from_bytes)
    # the config travels in the safetensors header of the single-file form
    (n,) = struct.unpack("<Q", archive[:8])
    meta = json.loads(archive[8 : 8 + n])["__metadata__"]
    assert json.loads(meta["adapter_config"])["base_model"]["id"] == "toy-base"


def test_digest_ignores_timestamps_but_not_values(tmp_path: Path) -> None:
    model, _ = trained_toy()
    a = load_adapter(save_adapter(model, tmp_path / "a", "toy-base", note="one"))
    b = load_adapter(save_adapter(model, tmp_path / "b", "toy-base", note="two"))
    assert adapter_sha256(a) == adapter_sha256(b)
    bumped = dict(b.tensors)
    bumped["flora.a.core"] = bumped["flora.a.core"].clone()
    bumped["flora.a.core"][0, 0] = torch.nextafter(bumped["flora.a.core"][0, 0], torch.tensor(9.0))
    assert adapter_sha256(Adapter(**{**b.__dict__, "tensors": bumped})) != adapter_sha256(b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_and_full_precision_are_accepted(tmp_path: Path, dtype: torch.dtype) -> None:
    model, _ = trained_toy()
    adapter = load_adapter(save_adapter(model, tmp_path / "f32", "toy-base")).to(dtype=dtype)
    loaded = load_adapter(save_adapter(adapter, tmp_path / "x.flora"))
    assert {t.dtype for t in loaded.tensors.values()} == {dtype}
    for key, value in adapter.tensors.items():
        assert torch.equal(loaded.tensors[key], value)


def test_adapter_views() -> None:
    model, _ = trained_toy()
    from flora.adapter import adapter_from_model

    adapter = adapter_from_model(model, "toy-base")
    assert adapter.layer_names() == ["a", "c"]
    assert torch.equal(adapter.core("c"), model.c.core.detach())
    assert [tuple(u.shape) for u in adapter.factors("c")] == [(6, 2), (2, 2), (3, 2), (3, 2)]
    assert set(adapter.full_state("head")) == {"weight", "bias"}
    # a: 6*2 + 8*2 + 2*2 = 32; c: 6*2 + 2*2 + 3*2 + 3*2 + 16 = 44; head: 18 + 3
    assert adapter.num_parameters == 32 + 44 + 21
    assert adapter.nbytes == 4 * adapter.num_parameters
    assert adapter.to(dtype=torch.float16).nbytes == 2 * adapter.num_parameters


def test_docs_flora_md_examples_run() -> None:
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "flora.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, "docs/flora.md", "exec"), {"__name__": "docs_example"})


# -- config and weights belong together ------------------------------------------------------


def _other_toy() -> nn.Module:
    """`trained_toy`'s structure with other adapter values (same shapes)."""
    model, _ = trained_toy()
    with torch.no_grad():
        for _, layer in flora.adapter_layers(model):
            layer.core.mul_(-2.0)
    return model


def test_a_config_with_another_saves_weights_is_refused(tmp_path: Path) -> None:
    import hashlib

    from flora.adapter.archive import pack_single_file
    from flora.errors import AdapterFormatError

    first, second = tmp_path / "first", tmp_path / "second"
    save_adapter(trained_toy()[0], first, "toy-base", labels=["x", "y", "z"])
    save_adapter(_other_toy(), second, "toy-base", labels=["z", "y", "x"])
    linked = json.loads((first / CONFIG_NAME).read_text())["tensors_sha256"]
    other = json.loads((second / CONFIG_NAME).read_text())["tensors_sha256"]
    assert linked != other
    # the digest is over the tensors, not the file: the single-file form has the same one
    packed = tmp_path / "first.flora"
    digest = pack_single_file(first / CONFIG_NAME, first / WEIGHTS_NAME, packed)
    assert digest == hashlib.sha256(packed.read_bytes()).hexdigest()
    assert load_adapter(packed).labels == ["x", "y", "z"]
    (first / WEIGHTS_NAME).write_bytes((second / WEIGHTS_NAME).read_bytes())
    message = (
        f"{WEIGHTS_NAME} does not belong to {CONFIG_NAME}: the config was saved with tensors "
        f"{linked}, these weights hash to {other} (a save cut off between its two files, or "
        "files of two adapters mixed)"
    )
    with pytest.raises(AdapterFormatError) as err:
        load_adapter(first)
    assert str(err.value) == message
    pack_single_file(first / CONFIG_NAME, first / WEIGHTS_NAME, packed)  # as an upload is
    with pytest.raises(AdapterFormatError) as err:
        load_adapter(packed)
    assert str(err.value) == message
    # A config without the field (written before it existed) is taken as it is.
    legacy = json.loads((first / CONFIG_NAME).read_text())
    del legacy["tensors_sha256"]
    (first / CONFIG_NAME).write_text(json.dumps(legacy))
    assert load_adapter(first).labels == ["x", "y", "z"]


def test_a_save_cut_between_its_two_renames_leaves_a_pair_that_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flora.adapter.io as io
    from flora.errors import AdapterFormatError

    save_adapter(trained_toy()[0], tmp_path, "toy-base", labels=["x", "y", "z"])
    real = io.atomic_write

    def killed(path: Path, data: bytes) -> None:
        if path.name == CONFIG_NAME:
            raise KeyboardInterrupt  # the process dies after the weights' rename
        real(path, data)

    monkeypatch.setattr(io, "atomic_write", killed)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(_other_toy(), tmp_path, "toy-base", labels=["z", "y", "x"])
    with pytest.raises(AdapterFormatError, match=f"^{WEIGHTS_NAME} does not belong to"):
        load_adapter(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_adapter_files_get_the_mode_open_would_give(tmp_path: Path, umask: int) -> None:
    import os

    old = os.umask(umask)
    try:
        save_adapter(trained_toy()[0], tmp_path / "dir", "toy-base")
        save_adapter(trained_toy()[0], tmp_path / "one.flora", "toy-base")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for path in (tmp_path / "dir" / CONFIG_NAME, tmp_path / "dir" / WEIGHTS_NAME):
        assert path.stat().st_mode & 0o777 == want, path
    assert (tmp_path / "one.flora").stat().st_mode & 0o777 == want
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == sorted(
        [CONFIG_NAME, WEIGHTS_NAME]
    )
