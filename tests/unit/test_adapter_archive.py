"""The single-file form and the header readers the server shares with the loader:
`header_from_prefix`, `read_file_header`, `read_json_object` (container.py) and
`pack_single_file`, `embedded_config`, `read_embedded_config` (archive.py). Same cap and
same strict JSON as `read_header`; packing is byte-for-byte what the format says."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch

import flora
from flora.adapter import load_adapter, pack_single_file, read_embedded_config, save_adapter
from flora.adapter.archive import embedded_config
from flora.adapter.container import (
    header_from_prefix,
    read_file_header,
    read_header,
    read_json_object,
)
from flora.errors import AdapterFormatError, HeaderTooLargeError


def safetensors_bytes(header_json: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header_json)) + header_json + data


# A weights file written by hand: spaces, `__metadata__` last with a non-string value, a
# non-ASCII tensor name, BF16 + F32 tensors and a data section of 14 bytes (not 8-aligned).
WEIGHTS_HEADER = (
    '{"b.core": {"dtype": "BF16", "shape": [3], "data_offsets": [8, 14]}, '
    '"a.f\u00e9": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
    '"__metadata__": {"format": "pt", "n": 1}}'
).encode()
WEIGHTS_DATA = bytes(range(1, 15))
CONFIG = (
    '{"method": "flora", "format_version": 1, "config": {"rank": 2, "scale": 0.5, '
    '"targets": ["q", "v"]}, "name": "caf\u00e9 \\u2713", "z": null}'
).encode()
# What the registry's own packer wrote for these two files before the library owned it,
# and what the layout gives: header = canonical JSON with `__metadata__` first (values as
# strings, the config as sorted compact ASCII JSON after the existing keys), padded with
# spaces to 8 bytes; then the data section unchanged.
PACKED_HEADER = (
    b'{"__metadata__":{"format":"pt","n":"1","adapter_config":"{\\"config\\":{\\"rank\\":2,'
    b'\\"scale\\":0.5,\\"targets\\":[\\"q\\",\\"v\\"]},\\"format_version\\":1,\\"method\\":'
    b'\\"flora\\",\\"name\\":\\"caf\\\\u00e9 \\\\u2713\\",\\"z\\":null}"},"b.core":{"dtype":'
    b'"BF16","shape":[3],"data_offsets":[8,14]},"a.f\\u00e9":{"dtype":"F32","shape":[2],'
    b'"data_offsets":[0,8]}}     '
)
PACKED_SHA256 = "e10e9635e1481a53a93e508131b255b95cf1969d2e28f587bec812dcf8ce01de"


def write_pair(tmp_path: Path, config: bytes = CONFIG, weights: bytes | None = None) -> tuple:
    c, w = tmp_path / "c.json", tmp_path / "w.safetensors"
    c.write_bytes(config)
    w.write_bytes(safetensors_bytes(WEIGHTS_HEADER, WEIGHTS_DATA) if weights is None else weights)
    return c, w, tmp_path / "out.flora"


# -- header_from_prefix ----------------------------------------------------------------


def test_prefix_says_how_many_bytes_it_needs_then_parses() -> None:
    blob = safetensors_bytes(b'{"__metadata__": {"k": "v"}}  ', b"\x00" * 4)
    assert header_from_prefix(b"") == 9 and header_from_prefix(blob[:8]) == 9
    assert header_from_prefix(blob[:9]) == 8 + 30 == header_from_prefix(blob[:37])
    assert header_from_prefix(blob[:38]) == {"__metadata__": {"k": "v"}}
    assert header_from_prefix(blob) == {"__metadata__": {"k": "v"}}  # data bytes ignored


def test_prefix_cap_is_checked_from_the_length_alone() -> None:
    # No JSON byte follows: the cap is judged before any of it is read.
    prefix = struct.pack("<Q", 1025) + b"{"
    with pytest.raises(HeaderTooLargeError, match="header length 1025 exceeds the cap of 1024"):
        header_from_prefix(prefix, max_header_bytes=1024)
    assert header_from_prefix(prefix, max_header_bytes=1025) == 8 + 1025
    default = struct.pack("<Q", 16 * 1024 * 1024 + 1) + b"{"
    with pytest.raises(HeaderTooLargeError, match="exceeds the cap of 16777216 bytes"):
        header_from_prefix(default)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b'{"a": {"x": NaN}}', "non-standard JSON constant NaN"),
        (b'{"a": -Infinity}', "non-standard JSON constant -Infinity"),
        (b'{"a": 1, "b": 2, "a": 3}', "duplicate key 'a'"),
        (b'{"__metadata__": {"k": "1", "k": "2"}}', "duplicate key 'k'"),
        (b"[1, 2]", "header is not a JSON object"),
        (b'{"a": "\xff"}', "not valid JSON"),
    ],
)
def test_prefix_json_is_strict(header: bytes, message: str) -> None:
    with pytest.raises(AdapterFormatError, match=message):
        header_from_prefix(safetensors_bytes(header), what="weights")
    # The same rule as the loader's, from the same code.
    with pytest.raises(AdapterFormatError, match=message):
        read_header(safetensors_bytes(header), what="weights")


def test_prefix_refuses_pickle() -> None:
    with pytest.raises(AdapterFormatError, match="pickle"):
        header_from_prefix(b"\x80\x04\x95" + b"\x00" * 20)


# -- read_file_header / read_json_object ------------------------------------------------


def test_file_header_and_data_start(tmp_path: Path) -> None:
    _, w, _ = write_pair(tmp_path)
    header, start = read_file_header(w)
    assert start == 8 + len(WEIGHTS_HEADER)
    assert header["__metadata__"] == {"format": "pt", "n": 1}  # raw: values as in the file
    assert header["a.f\u00e9"]["data_offsets"] == [0, 8]
    assert w.read_bytes()[start:] == WEIGHTS_DATA


@pytest.mark.parametrize(
    ("blob", "error", "message"),
    [
        (b"\x05\x00\x00", AdapterFormatError, r"truncated \(3 bytes, no header length\)"),
        (struct.pack("<Q", 40) + b"{}", AdapterFormatError, "header says 40 bytes, 2 present"),
        (struct.pack("<Q", 40), AdapterFormatError, "header says 40 bytes, 0 present"),
        (struct.pack("<Q", 2**40) + b"{}", HeaderTooLargeError, "exceeds the cap"),
    ],
)
def test_file_header_truncated_or_over_the_cap(
    tmp_path: Path, blob: bytes, error: type, message: str
) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(blob)
    with pytest.raises(error, match=message):
        read_file_header(path, what="weights")


def test_json_object_cap_and_strictness(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_bytes(b'{"a": "' + b"x" * 91 + b'"}')  # exactly 100 bytes
    assert read_json_object(path, max_bytes=100) == {"a": "x" * 91}
    with pytest.raises(HeaderTooLargeError, match="config: larger than the cap of 99 bytes"):
        read_json_object(path, max_bytes=99)
    for text, message in [
        (b'{"rank": 2, "rank": 3}', "duplicate key 'rank'"),
        (b'{"scale": NaN}', "non-standard JSON constant NaN"),
        (b'["a"]', "config: must be a JSON object"),
    ]:
        path.write_bytes(text)
        with pytest.raises(AdapterFormatError, match=message):
            read_json_object(path)


# -- the single-file form ---------------------------------------------------------------


def test_pack_is_byte_identical_to_the_format(tmp_path: Path) -> None:
    c, w, out = write_pair(tmp_path)
    digest = pack_single_file(c, w, out)
    blob = out.read_bytes()
    assert blob == struct.pack("<Q", len(PACKED_HEADER)) + PACKED_HEADER + WEIGHTS_DATA
    assert digest == hashlib.sha256(blob).hexdigest() == PACKED_SHA256
    # Read back: the embedded config is the input config, and the header is the input's.
    assert read_embedded_config(out) == json.loads(CONFIG)
    header, start = read_file_header(out)
    assert start % 8 == 0 and blob[start:] == WEIGHTS_DATA
    assert header["b.core"] == json.loads(WEIGHTS_HEADER)["b.core"]


def test_pack_of_a_saved_directory_loads_as_the_same_adapter(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(6, 5)
    flora.inject(model, flora.FloraConfig(target_modules=["proj"], rank=2))
    with torch.no_grad():
        model.proj.core.normal_()
    directory = save_adapter(model, tmp_path / "dir", "toy")
    out = tmp_path / "packed.flora"
    pack_single_file(directory / "adapter_config.json", directory / "adapter.safetensors", out)
    packed, original = load_adapter(out), load_adapter(directory)
    assert packed.tensors.keys() == original.tensors.keys()
    for key, tensor in original.tensors.items():
        assert torch.equal(packed.tensors[key], tensor)
    assert packed.header().to_json_dict() == original.header().to_json_dict()
    # Packing twice gives the same bytes: the stored form of a pair is a function of it.
    again = tmp_path / "again.flora"
    pack_single_file(directory / "adapter_config.json", directory / "adapter.safetensors", again)
    assert again.read_bytes() == out.read_bytes()


@pytest.mark.parametrize(
    ("config", "weights_header", "error", "message"),
    [
        (b'{"config": {"rank": 2, "rank": 9}}', None, AdapterFormatError, "config: .*'rank'"),
        (b'{"config": {"scale": Infinity}}', None, AdapterFormatError, "constant Infinity"),
        (CONFIG, b'{"x": {}, "x": {}}', AdapterFormatError, "weights header: .*duplicate key"),
        (CONFIG, b'{"__metadata__": ["a"]}', AdapterFormatError, "__metadata__ must be an obj"),
    ],
)
def test_pack_refuses_non_strict_input_and_writes_nothing(
    tmp_path: Path, config: bytes, weights_header: bytes | None, error: type, message: str
) -> None:
    weights = None if weights_header is None else safetensors_bytes(weights_header)
    c, w, out = write_pair(tmp_path, config, weights)
    with pytest.raises(error, match=message):
        pack_single_file(c, w, out)
    assert not out.exists()


def test_pack_caps_config_and_weights_header(tmp_path: Path) -> None:
    c, w, out = write_pair(tmp_path)
    with pytest.raises(HeaderTooLargeError, match="config: larger than the cap of 64 bytes"):
        pack_single_file(c, w, out, max_header_bytes=64)
    c.write_bytes(b"{}")
    with pytest.raises(HeaderTooLargeError, match="weights: header length 175 exceeds"):
        pack_single_file(c, w, out, max_header_bytes=174)
    assert not out.exists()
    pack_single_file(c, w, out, max_header_bytes=175)  # at the cap: accepted
    assert read_embedded_config(out) == {}


def test_embedded_config_needs_a_strict_object() -> None:
    assert embedded_config({"__metadata__": {"adapter_config": '{"a": 1}'}}) == {"a": 1}
    for header, message in [
        ({}, "has no 'adapter_config'"),
        ({"__metadata__": "x"}, "has no 'adapter_config'"),
        ({"__metadata__": {"adapter_config": 3}}, "has no 'adapter_config'"),
        ({"__metadata__": {"adapter_config": '{"a": 1, "a": 2}'}}, "duplicate key 'a'"),
        ({"__metadata__": {"adapter_config": "[1]"}}, "adapter_config is not a JSON object"),
    ]:
        with pytest.raises(AdapterFormatError, match=message):
            embedded_config(header)
