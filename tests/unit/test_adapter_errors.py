"""Every way an adapter file can be wrong raises its own AdapterError subclass."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as st_save
from torch import nn

import flora
from flora.adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    apply_adapter,
    load_adapter,
    load_adapter_bytes,
    save_adapter,
    validate_against,
)
from flora.errors import (
    AdapterConfigError,
    AdapterError,
    AdapterFormatError,
    BaseMismatchError,
    HeaderTooLargeError,
    MissingTensorError,
    NonFiniteError,
    RankLimitError,
    TensorDtypeError,
    TensorShapeError,
    UnknownModuleError,
    UnknownTensorError,
)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(6, 4)


def saved(tmp_path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], nn.Module]:
    """(config doc, tensors, pristine base) of a valid rank-2 adapter on a and b."""
    torch.manual_seed(0)
    base = Toy()
    model = Toy()
    model.load_state_dict(base.state_dict())
    flora.inject(model, flora.FloraConfig(target_modules=["a", "b"], rank=2))
    with torch.no_grad():
        model.a.core.normal_()
    save_adapter(model, tmp_path / "ok", "toy")
    doc = json.loads((tmp_path / "ok" / CONFIG_NAME).read_text())
    adapter = load_adapter(tmp_path / "ok")
    return doc, dict(adapter.tensors), base


def load_pair(doc: dict[str, Any], tensors: dict[str, torch.Tensor], **kw: Any) -> Any:
    return load_adapter_bytes(json.dumps(doc).encode(), st_save(tensors), **kw)


def test_valid_pair_loads(tmp_path: Path) -> None:
    doc, tensors, _ = saved(tmp_path)
    assert load_pair(doc, tensors).modules["a"].ranks == (2, 2)


# -- the container -------------------------------------------------------------------


def test_truncated_file(tmp_path: Path) -> None:
    doc, tensors, _ = saved(tmp_path)
    data = st_save(tensors)
    for cut in (0, 5, 8, 20, len(data) - 1):
        with pytest.raises(AdapterFormatError, match=r"truncated|JSON"):
            load_adapter_bytes(json.dumps(doc), data[:cut])


def test_huge_header_length_is_refused_before_parsing(tmp_path: Path) -> None:
    data = struct.pack("<Q", 2**40) + b"{}"
    with pytest.raises(HeaderTooLargeError, match="1099511627776"):
        load_adapter(data)
    # a valid archive whose header merely exceeds a small cap is refused the same way
    saved(tmp_path)
    archive = save_adapter(load_adapter(tmp_path / "ok"), tmp_path / "x.flora").read_bytes()
    (n,) = struct.unpack("<Q", archive[:8])
    assert load_adapter(archive, max_header_bytes=n).modules
    with pytest.raises(HeaderTooLargeError, match=f"{n} exceeds the cap of {n - 1}"):
        load_adapter(archive, max_header_bytes=n - 1)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x80\x04}\x94.",  # pickle protocol 4 of {} written by hand
        b"\x80\x02}q\x00.",  # protocol 2
        b"PK\x03\x04" + b"\x00" * 60,  # a torch.save zip archive
    ],
)
def test_pickle_renamed_safetensors(tmp_path: Path, payload: bytes) -> None:
    saved(tmp_path)
    (tmp_path / "ok" / WEIGHTS_NAME).write_bytes(payload)
    with pytest.raises(AdapterFormatError, match="pickle"):
        load_adapter(tmp_path / "ok")
    (tmp_path / "evil.flora").write_bytes(payload)
    with pytest.raises(AdapterFormatError, match="pickle"):
        load_adapter(tmp_path / "evil.flora")


def test_bad_json_config(tmp_path: Path) -> None:
    _, tensors, _ = saved(tmp_path)
    for text in (b"{", b'{"a": NaN}', b'{"a": 1, "a": 2}', b"\xff\xfe", b"[" * 100_000):
        with pytest.raises(AdapterFormatError):
            load_adapter_bytes(text, st_save(tensors))


def test_archive_without_config_is_refused(tmp_path: Path) -> None:
    _, tensors, _ = saved(tmp_path)
    with pytest.raises(AdapterFormatError, match="adapter_config"):
        load_adapter(st_save(tensors))


def test_overlapping_offsets_are_refused(tmp_path: Path) -> None:
    doc, tensors, _ = saved(tmp_path)
    data = st_save(tensors)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    first, second = sorted(k for k in header if k != "__metadata__")[:2]
    header[second]["data_offsets"] = header[first]["data_offsets"]
    raw = json.dumps(header).encode()
    with pytest.raises(AdapterFormatError, match=r"overlap|gap|cover|spans"):
        load_adapter_bytes(json.dumps(doc), struct.pack("<Q", len(raw)) + raw + data[8 + n :])


# -- tensors -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values(tmp_path: Path, bad: float) -> None:
    doc, tensors, _ = saved(tmp_path)
    tensors["flora.b.factor.1"] = tensors["flora.b.factor.1"].clone()
    tensors["flora.b.factor.1"][3, 1] = bad
    with pytest.raises(NonFiniteError, match=r"flora\.b\.factor\.1"):
        load_pair(doc, tensors)


def test_wrong_shape(tmp_path: Path) -> None:
    doc, tensors, _ = saved(tmp_path)
    tensors["flora.a.factor.0"] = torch.zeros(6, 3)
    with pytest.raises(TensorShapeError, match=r"flora\.a\.factor\.0.*\[6, 3\].*\[6, 2\]"):
        load_pair(doc, tensors)


def test_unknown_key(tmp_path: Path) -> None:
    doc, tensors, _ = saved(tmp_path)
    tensors["flora.a.extra"] = torch.zeros(2)
    with pytest.raises(UnknownTensorError, match=r"flora\.a\.extra"):
        load_pair(doc, tensors)
    del tensors["flora.a.extra"]
    tensors["full.b.weight"] = torch.zeros(4, 6)  # b is not in train_modules
    with pytest.raises(UnknownTensorError, match=r"full\.b\.weight"):
        load_pair(doc, tensors)


def test_missing_key(tmp_path: Path) -> None:
    doc, tensors, _ = saved(tmp_path)
    del tensors["flora.b.core"]
    with pytest.raises(MissingTensorError, match=r"flora\.b\.core"):
        load_pair(doc, tensors)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.float64])
def test_other_dtypes_are_refused(tmp_path: Path, dtype: torch.dtype) -> None:
    doc, tensors, _ = saved(tmp_path)
    tensors["flora.a.core"] = tensors["flora.a.core"].to(dtype)
    with pytest.raises(TensorDtypeError, match=r"flora\.a\.core"):
        load_pair(doc, tensors)


def test_rank_over_the_limit(tmp_path: Path) -> None:
    doc, tensors, _ = saved(tmp_path)
    with pytest.raises(RankLimitError, match="rank 2"):
        load_pair(doc, tensors, max_rank=1)
    doc["modules"]["b"]["ranks"] = [5, 2]  # out of b is 4
    with pytest.raises(RankLimitError, match="mode size 4"):
        load_pair(doc, tensors)


# -- the config ----------------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        *parents, leaf = path.split("/")
        node = doc
        for p in parents:
            node = node[p]
        node[leaf] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_set("surprise", 1), "unknown fields: surprise"),
        (_set("config/lora_alpha", 16), "lora_alpha"),
        (_set("auto_map", {"AutoModel": "evil.Model"}), "auto_map"),
        (_set("metadata/nested", {"auto_map": "x.y"}), "auto_map"),
        (_set("format_version", 2), "format_version"),
        (_set("method", "lora"), "method"),
        (_set("modules/a/extra", 1), "module 'a'"),
        (_set("modules/a/kind", "rnn"), "module 'a'"),
        (_set("base_model/fingerprint", "md5:abc"), "fingerprint"),
        (_set("labels", [1, 2]), "labels"),
        (_set("modules/a/ranks", [2, 1]), "differ from the config"),
        (lambda d: d.pop("modules"), "missing fields: modules"),
        (lambda d: d["config"].update(target_modules=["b"]), "not selected"),
    ],
)
def test_config_allowlist(
    tmp_path: Path, edit: Callable[[dict[str, Any]], Any], match: str
) -> None:
    doc, tensors, _ = saved(tmp_path)
    edit(doc)
    with pytest.raises(AdapterConfigError, match=match):
        load_pair(doc, tensors)


# -- against a base ------------------------------------------------------------------


def test_wrong_base_fingerprint(tmp_path: Path) -> None:
    _, _, base = saved(tmp_path)
    other = Toy()  # same architecture, other weights
    with pytest.raises(BaseMismatchError, match="fingerprint"):
        load_adapter(tmp_path / "ok", base=other)
    adapter = load_adapter(tmp_path / "ok")
    with pytest.raises(BaseMismatchError):
        apply_adapter(other, adapter)
    assert type(other.a) is nn.Linear  # untouched after the refusal
    apply_adapter(other, adapter, check_fingerprint=False)
    assert isinstance(other.a, flora.FloraLayer)
    load_adapter(tmp_path / "ok", base=base)  # the right base passes


def test_unknown_module_and_shape(tmp_path: Path) -> None:
    saved(tmp_path)
    adapter = load_adapter(tmp_path / "ok")
    specs = flora.describe_base(Toy())
    with pytest.raises(UnknownModuleError, match="'b' does not exist"):
        validate_against(adapter, {"a": specs["a"]}, None)
    wrong = dict(specs, b=flora.ModuleSpec("linear", (4, 7)))
    with pytest.raises(UnknownModuleError, match=r"'b'.*\[4, 7\]"):
        validate_against(adapter, wrong, None)
    extra = dict(specs, **{"c.b": flora.ModuleSpec("linear", (4, 6))})
    with pytest.raises(BaseMismatchError, match=r"'c\.b'"):
        validate_against(adapter, extra, None)


def test_every_error_is_a_value_error() -> None:
    for cls in (AdapterFormatError, HeaderTooLargeError, AdapterConfigError, NonFiniteError):
        assert issubclass(cls, AdapterError) and issubclass(cls, ValueError)
    assert len({c.error_type for c in AdapterError.__subclasses__()}) == len(
        AdapterError.__subclasses__()
    )


def test_header_length_that_looks_like_pickle_magic_still_loads(tmp_path: Path) -> None:
    # 0x0280 = 640 bytes of header starts the file with 80 02, a pickle protocol-2 opcode.
    doc, tensors, _ = saved(tmp_path)
    hits = 0
    for pad in range(0, 400):
        data = st_save(tensors, metadata={"format": "x" * pad})
        if data[:2] == b"\x80\x02":
            hits += 1
            assert load_adapter_bytes(json.dumps(doc), data).modules["b"].ranks == (2, 2)
    assert hits > 0
