"""The one-pass finiteness check over raw safetensors bytes agrees with ``torch.isfinite``.

``container.all_finite`` reads the data section in dtype runs (bfloat16 by its exponent
bits); these tests compare it with the per-tensor torch reference on every dtype, on
non-finite values at run edges, on large-but-finite and subnormal values, and on files
whose tensors sit at unaligned offsets (hand-written headers, no padding).
"""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch

from flora.adapter import load_adapter_bytes
from flora.adapter.container import all_finite, encode_tensors, read_header
from flora.errors import NonFiniteError

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
_TAG = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def reference(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def raw_file(tensors: dict[str, torch.Tensor], lead: int = 0) -> bytes:
    """A safetensors file in insertion order with no alignment padding at all.

    ``lead`` extra spaces in the header shift the data section by that many bytes.
    """
    header, blobs, cursor = {}, [], 0
    for name, t in tensors.items():
        blob = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": _TAG[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [cursor, cursor + len(blob)],
        }
        blobs.append(blob)
        cursor += len(blob)
    text = json.dumps(header).encode() + b" " * lead
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def check(data: bytes, tensors: dict[str, torch.Tensor]) -> bool:
    _, entries = read_header(data)
    got = all_finite(data, entries)
    assert got == reference(tensors)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [0, 37, -1])
def test_one_bad_value_in_a_run(dtype: torch.dtype, bad: float, where: int) -> None:
    torch.manual_seed(0)
    tensors = {f"t{i}": torch.randn(5, 8).to(dtype) for i in range(4)}
    assert check(encode_tensors(tensors, None), tensors)
    # first element of the run, an inner one, the last byte of the last tensor
    name = {0: "t0", 37: "t2", -1: "t3"}[where]
    tensors[name].view(-1)[where % 40] = bad
    assert not check(encode_tensors(tensors, None), tensors)


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_finite_values_pass(dtype: torch.dtype) -> None:
    info = torch.finfo(dtype)
    values = [info.max, -info.max, info.tiny, info.tiny / 4, -0.0, 0.0, info.eps, 1.0]
    tensors = {"x": torch.tensor(values, dtype=torch.float32).to(dtype)}
    assert check(encode_tensors(tensors, None), tensors)


@pytest.mark.parametrize("lead", [0, 1, 2, 3])
@pytest.mark.parametrize("bad_name", [None, "a16", "b32", "c16", "d32"])
def test_mixed_dtypes_at_unaligned_offsets(lead: int, bad_name: str | None) -> None:
    # Odd element counts put every later tensor off its natural alignment.
    torch.manual_seed(1)
    tensors = {
        "a16": torch.randn(3).to(torch.bfloat16),
        "b32": torch.randn(5),
        "c16": torch.randn(7).to(torch.float16),
        "d32": torch.randn(2, 3),
    }
    if bad_name is not None:
        tensors[bad_name].view(-1)[-1] = math.nan
    assert check(raw_file(tensors, lead), tensors) == (bad_name is None)


def test_empty_tensor_is_finite() -> None:
    tensors = {"e": torch.zeros(0, 4), "x": torch.ones(2)}
    assert check(raw_file(tensors), tensors)


def test_load_names_the_first_bad_tensor_in_sorted_order() -> None:
    """Two bad bf16 factors: the error names the sorted-first one, as the slow check did."""
    torch.manual_seed(0)
    config = {
        "format_version": 1,
        "method": "flora",
        "config": {"target_modules": ["a", "b"], "rank": 2},
        "base_model": {"id": "toy", "fingerprint": None},
        "modules": {
            n: {"kind": "linear", "weight_shape": [6, 8], "groups": 1, "ranks": [2, 2]}
            for n in ("a", "b")
        },
    }
    tensors: dict[str, torch.Tensor] = {}
    for n in ("a", "b"):
        tensors[f"flora.{n}.core"] = torch.randn(2, 2).to(torch.bfloat16)
        tensors[f"flora.{n}.factor.0"] = torch.randn(6, 2).to(torch.bfloat16)
        tensors[f"flora.{n}.factor.1"] = torch.randn(8, 2).to(torch.bfloat16)
    good = load_adapter_bytes(json.dumps(config).encode(), encode_tensors(tensors, None))
    assert good.tensors["flora.a.core"].dtype == torch.bfloat16
    torch.testing.assert_close(good.tensors["flora.b.factor.1"], tensors["flora.b.factor.1"])
    tensors["flora.b.factor.0"][1, 1] = math.inf
    tensors["flora.a.factor.1"][7, 0] = math.nan
    with pytest.raises(NonFiniteError, match=r"^tensor 'flora\.a\.factor\.1' holds NaN or Inf"):
        load_adapter_bytes(json.dumps(config).encode(), encode_tensors(tensors, None))
