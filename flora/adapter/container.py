"""Safetensors bytes in and out, validated before anything is decoded.

A safetensors file is ``[u64 little-endian header length N][N bytes of JSON header][data]``.
The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the data section) plus an optional ``"__metadata__"`` of str -> str.
We read the 8-byte length and compare it with the cap *before* looking at the JSON, then
check every entry (dtype allowlist, shapes, offsets exactly tiling the data section) and
only then let ``safetensors`` decode. No pickle path exists here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from flora.errors import AdapterFormatError, HeaderTooLargeError, TensorDtypeError

DEFAULT_MAX_HEADER_BYTES = 16 * 1024 * 1024

# safetensors dtype tag -> (torch dtype, bytes per element). Only these are accepted.
ALLOWED_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F32": (torch.float32, 4),
}
_TORCH_TO_TAG = {dt: tag for tag, (dt, _) in ALLOWED_DTYPES.items()}
# Explicitly little-endian (the file's byte order) numpy views for the finiteness pass.
_NUMPY_FLOAT = {"F16": "<f2", "F32": "<f4"}

# The first bytes of a pickle (protocol 2+ starts with PROTO 0x80) or a torch zip archive.
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")
# The header length and the first byte of the JSON: enough to tell safetensors from a pickle.
_MIN_PREFIX = 9


def strict_json_loads(text: str | bytes, what: str) -> Any:
    """``json.loads`` that refuses NaN/Infinity literals, duplicate keys and deep nesting.

    Raises:
        AdapterFormatError: naming ``what`` when the text is not strict JSON.
    """

    def no_constants(name: str) -> Any:
        raise ValueError(f"non-standard JSON constant {name}")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # Fast path: a header has one object per tensor, so build it with dict() and only
        # walk the pairs (to name the first repeated key) when something collapsed.
        out = dict(pairs)
        if len(out) == len(pairs):
            return out
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
        raise AssertionError("unreachable: dict() dropped a key that is not repeated")

    try:
        return json.loads(text, parse_constant=no_constants, object_pairs_hook=no_duplicates)
    except RecursionError as exc:
        raise AdapterFormatError(f"{what}: JSON nested too deeply") from exc
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AdapterFormatError(f"{what}: not valid JSON ({exc})") from exc


def read_header(
    data: bytes, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, what: str = "adapter"
) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Parse and check a safetensors header without decoding any tensor.

    Returns:
        ``(metadata, entries)``: the ``__metadata__`` dict (empty if absent) and, per tensor
        name, ``{"dtype": str, "shape": list[int], "data_offsets": [begin, end]}``.

    Raises:
        HeaderTooLargeError: the declared header length exceeds ``max_header_bytes``.
        AdapterFormatError: truncated file, pickle bytes, bad JSON, bad offsets.
        TensorDtypeError: a tensor is not F16/BF16/F32.
    """
    header_len = _declared_length(data, max_header_bytes, what)
    if header_len > len(data) - 8:
        raise _truncated(data, header_len, what)
    header = _header_object(data[8 : 8 + header_len], what)
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise AdapterFormatError(f"{what}: __metadata__ must map strings to strings")
    data_len = len(data) - 8 - header_len
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        spans.append(_check_entry(name, entry, what))
    # Offsets must tile the data section exactly: no gaps, no overlap, nothing trailing.
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise AdapterFormatError(f"{what}: tensor {name!r} data offsets overlap or leave a gap")
        cursor = end
    if cursor != data_len:
        raise AdapterFormatError(
            f"{what}: data section is {data_len} bytes but tensors cover {cursor} (truncated?)"
        )
    return metadata, header


def header_from_prefix(
    prefix: bytes, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, what: str = "adapter"
) -> dict[str, Any] | int:
    """The JSON header of a safetensors file from its first bytes, or, when ``prefix`` is
    too short to hold it, the number of leading bytes that do (read that many, call again).

    The length cap and the strict JSON are :func:`read_header`'s; the tensor entries are not
    checked (that needs the data section) and ``__metadata__`` stays in the dict as it is.

    Raises:
        HeaderTooLargeError: the declared header length exceeds ``max_header_bytes``.
        AdapterFormatError: pickle bytes, a header that is not strict JSON or not an object.
    """
    if len(prefix) < _MIN_PREFIX:
        return _MIN_PREFIX
    header_len = _declared_length(prefix, max_header_bytes, what)
    if len(prefix) < 8 + header_len:
        return 8 + header_len
    return _header_object(prefix[8 : 8 + header_len], what)


def read_file_header(
    path: str | os.PathLike[str],
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    what: str = "adapter",
) -> tuple[dict[str, Any], int]:
    """``(header, data start)`` of the safetensors file at ``path``, reading only its header
    (see :func:`header_from_prefix`; a file too short to hold it is truncated).

    Raises:
        HeaderTooLargeError, AdapterFormatError: as :func:`header_from_prefix`, and a
        truncated file.
    """
    with Path(path).open("rb") as fh:
        prefix = fh.read(_MIN_PREFIX)
        found = header_from_prefix(prefix, max_header_bytes=max_header_bytes, what=what)
        if isinstance(found, int) and len(prefix) == _MIN_PREFIX:
            prefix += fh.read(found - len(prefix))
            found = header_from_prefix(prefix, max_header_bytes=max_header_bytes, what=what)
    if isinstance(found, int):
        raise _truncated(prefix, _declared_length(prefix, max_header_bytes, what), what)
    return found, 8 + int.from_bytes(prefix[:8], "little")


def read_json_object(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    what: str = "config",
) -> dict[str, Any]:
    """The strict JSON object in the file at ``path`` (a config), read only up to its cap.

    Raises:
        HeaderTooLargeError: the file is larger than ``max_bytes``.
        AdapterFormatError: not strict JSON (:func:`strict_json_loads`) or not an object.
    """
    with Path(path).open("rb") as fh:
        raw = fh.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise HeaderTooLargeError(f"{what}: larger than the cap of {max_bytes} bytes")
    value = strict_json_loads(raw, what)
    if not isinstance(value, dict):
        raise AdapterFormatError(f"{what}: must be a JSON object")
    return value


def _declared_length(data: bytes, max_header_bytes: int, what: str) -> int:
    """The header length in the first 8 bytes, once they are known not to be a pickle's
    and the length is within the cap (before any JSON is looked at)."""
    # A safetensors header is JSON, so byte 8 is "{"; the magic bytes alone could also be
    # a legitimate little-endian header length (0x0280 = 640 starts with 80 02).
    looks_pickled = data[:2] in _PICKLE_MAGIC or data[:4] in _PICKLE_MAGIC
    if looks_pickled and data[8:9] != b"{":
        raise AdapterFormatError(f"{what}: this is a pickle/torch archive, not safetensors")
    if len(data) < 8:
        raise AdapterFormatError(f"{what}: truncated ({len(data)} bytes, no header length)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > max_header_bytes:
        raise HeaderTooLargeError(
            f"{what}: header length {header_len} exceeds the cap of {max_header_bytes} bytes"
        )
    return int(header_len)


def _truncated(data: bytes, header_len: int, what: str) -> AdapterFormatError:
    return AdapterFormatError(
        f"{what}: truncated (header says {header_len} bytes, {len(data) - 8} present)"
    )


def _header_object(raw: bytes, what: str) -> dict[str, Any]:
    header = strict_json_loads(raw, f"{what} header")
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{what}: header is not a JSON object")
    return header


def _check_entry(name: str, entry: Any, what: str) -> tuple[int, int, str]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise AdapterFormatError(f"{what}: tensor {name!r} has a malformed header entry")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise AdapterFormatError(f"{what}: tensor {name!r} dtype is not a string")
    if dtype not in ALLOWED_DTYPES:
        raise TensorDtypeError(
            f"{what}: tensor {name!r} has dtype {dtype}; only F16, BF16 and F32 are accepted"
        )
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise AdapterFormatError(f"{what}: tensor {name!r} shape is not a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_uint(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise AdapterFormatError(f"{what}: tensor {name!r} data_offsets are malformed")
    nbytes = math.prod(shape) * ALLOWED_DTYPES[dtype][1]
    if offsets[1] - offsets[0] != nbytes:
        raise AdapterFormatError(
            f"{what}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes, shape needs {nbytes}"
        )
    return offsets[0], offsets[1], name


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def decode_tensors(
    data: bytes, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, what: str = "adapter"
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Check the header (see :func:`read_header`), then decode every tensor.

    Returns ``(metadata, tensors)``; tensors are fresh CPU tensors that own their memory.
    """
    metadata, _entries = read_header(data, max_header_bytes=max_header_bytes, what=what)
    return metadata, decode_checked(data, what=what)


def decode_checked(data: bytes, *, what: str = "adapter") -> dict[str, torch.Tensor]:
    """Decode every tensor of ``data`` whose header :func:`read_header` already accepted.

    Callers that hold the parsed header use this instead of :func:`decode_tensors`, so the
    JSON header is parsed (in Python) once per load.
    """
    try:
        return _st_load(data)
    except Exception as exc:  # the Rust parser's own checks; our header pass should pre-empt them
        raise AdapterFormatError(f"{what}: safetensors could not decode it ({exc})") from exc


def all_finite(data: bytes, entries: dict[str, dict[str, Any]]) -> bool:
    """Whether every tensor of ``data`` is free of NaN and +-Inf, read from the raw bytes.

    ``entries`` is the :func:`read_header` result for ``data`` (offsets already checked to
    tile the data section). Tensors adjacent in the file with the same dtype form one run,
    and each run is one vectorised test over a zero-copy little-endian view (numpy handles
    unaligned offsets), so a file saved in one dtype costs one pass however many tensors it
    holds. An IEEE value is non-finite iff its exponent bits are all ones; bfloat16 has no
    numpy dtype, so its 8 exponent bits are tested directly: ``(x & 0x7F80) == 0x7F80``.
    This only answers yes or no; name the offender with ``validate.check_finite``.
    """
    (header_len,) = struct.unpack("<Q", data[:8])
    start = 8 + header_len
    spans = sorted(
        (e["data_offsets"][0], e["data_offsets"][1], e["dtype"]) for e in entries.values()
    )
    runs: list[list[Any]] = []
    for begin, end, dtype in spans:
        if runs and runs[-1][2] == dtype and runs[-1][1] == begin:
            runs[-1][1] = end
        else:
            runs.append([begin, end, dtype])
    for begin, end, dtype in runs:
        size = ALLOWED_DTYPES[dtype][1]
        count = (end - begin) // size
        if count == 0:
            continue
        if dtype == "BF16":
            bits = np.frombuffer(data, dtype="<u2", count=count, offset=start + begin)
            if bool(((bits & 0x7F80) == 0x7F80).any()):
                return False
        else:
            values = np.frombuffer(
                data, dtype=_NUMPY_FLOAT[dtype], count=count, offset=start + begin
            )
            if not bool(np.isfinite(values).all()):
                return False
    return True


def encode_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    """Serialize CPU-contiguous copies of ``tensors`` (float16/bfloat16/float32 only)."""
    for name, tensor in tensors.items():
        if tensor.dtype not in _TORCH_TO_TAG:
            raise TensorDtypeError(f"tensor {name!r} has dtype {tensor.dtype}; cannot save it")
    prepared = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return _st_save(prepared, metadata=metadata)


def tensors_sha256(data: bytes, entries: dict[str, dict[str, Any]]) -> str:
    """``"sha256:" + hex`` over the tensors of the safetensors file ``data``: per tensor,
    sorted by name, its name, dtype tag, shape and raw bytes (each length-prefixed).

    ``entries`` is :func:`read_header`'s result for ``data``. The digest ignores the
    header's ``__metadata__`` and the order of the tensors in the file, so a directory's
    weights file and the single-file form made from it (:func:`~flora.adapter.archive.
    pack_single_file`, or ``save_adapter(archive=True)``) give the same value.
    """
    (header_len,) = struct.unpack("<Q", data[:8])
    start = 8 + header_len
    view = memoryview(data)
    h = hashlib.sha256()
    for name in sorted(entries):
        entry = entries[name]
        begin, end = entry["data_offsets"]
        for part in (name.encode(), entry["dtype"].encode(), json.dumps(entry["shape"]).encode()):
            _feed(h, part)
        _feed(h, view[start + begin : start + end])
    return "sha256:" + h.hexdigest()


def _feed(h: Any, data: bytes | memoryview) -> None:
    # Length-prefix every field so bytes cannot shift between fields unnoticed.
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync, rename.

    Readers see either the old file or the complete new one, never a partial write. The
    file gets the mode ``open()`` would give it (0666 less the umask), not ``mkstemp``'s
    0600, so an adapter is as readable as the other files written beside it.
    """
    path = Path(path)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _create_temp(path: Path) -> tuple[int, str]:
    """A new, empty, exclusively created temp file beside ``path`` (mode 0666 & ~umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp file name beside {path}")


def fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not supported on every platform/filesystem.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
