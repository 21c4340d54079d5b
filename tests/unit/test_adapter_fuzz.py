"""Mutated adapter files raise AdapterError subclasses only: never another exception."""

from __future__ import annotations

import json
from functools import cache

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import flora
from flora.adapter import adapter_from_model, encode_adapter, load_adapter, load_adapter_bytes
from flora.errors import AdapterError


@cache
def files() -> tuple[bytes, bytes, bytes]:
    """(archive, directory-form weights, directory-form config) of a small adapter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Conv1d(5, 4, 3))
    flora.inject(model, flora.FloraConfig(target_modules=["0", "1"], rank=2, kernel_rank=1))
    adapter = adapter_from_model(model, "fuzz")
    archive, _ = encode_adapter(adapter, archive=True)
    weights, config = encode_adapter(adapter, archive=False)
    assert config is not None
    return archive, weights, config


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 16)),
)


def mutate(data: bytes, ops: list[tuple[str, int, object]]) -> bytes:
    buf = bytearray(data)
    for kind, where, arg in ops:
        i = where % (len(buf) + 1)
        if kind == "flip" and i < len(buf):
            buf[i] ^= int(arg)  # type: ignore[call-overload]
        elif kind == "truncate":
            del buf[i:]
        elif kind == "insert":
            buf[i:i] = bytes(arg)  # type: ignore[call-overload]
        elif kind == "delete":
            del buf[i : i + int(arg)]  # type: ignore[call-overload]
    return bytes(buf)


def only_adapter_errors(fn, *args) -> None:  # type: ignore[no-untyped-def]
    try:
        adapter = fn(*args)
    except AdapterError:
        return
    # A mutation that keeps the file valid (e.g. a flipped mantissa bit) must still
    # yield a fully valid adapter: finite values, tensors matching their modules.
    for name in adapter.layer_names():
        assert adapter.core(name).shape == adapter.modules[name].ranks
    assert all(bool(torch.isfinite(t).all()) for t in adapter.tensors.values())


FUZZ = settings(
    max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@FUZZ
@given(st.lists(mutation, min_size=1, max_size=3))
def test_mutated_archive(ops: list[tuple[str, int, object]]) -> None:
    archive, _, _ = files()
    only_adapter_errors(load_adapter, mutate(archive, ops))


@FUZZ
@given(st.lists(mutation, min_size=1, max_size=3), st.booleans())
def test_mutated_directory_pair(ops: list[tuple[str, int, object]], hit_config: bool) -> None:
    _, weights, config = files()
    if hit_config:
        config = mutate(config, ops)
    else:
        weights = mutate(weights, ops)
    only_adapter_errors(load_adapter_bytes, config, weights)


@FUZZ
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda kids: (
            st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3)
        ),
        max_leaves=8,
    ),
    st.sampled_from(["config", "base_model", "modules", "metadata", "labels", "task"]),
)
def test_arbitrary_json_values_in_config(value: object, field: str) -> None:
    _, weights, config = files()
    doc = json.loads(config)
    doc[field] = value
    only_adapter_errors(load_adapter_bytes, json.dumps(doc), weights)


def test_unmutated_files_load() -> None:
    archive, weights, config = files()
    assert load_adapter(archive).modules["1"].ranks == (2, 2, 1)
    assert load_adapter_bytes(config, weights).modules["0"].ranks == (2, 2)
