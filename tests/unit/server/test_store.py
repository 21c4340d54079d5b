"""LocalAdapterStore: atomic puts, digests, containment, and the registry on top of it."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
from api_fakes import make_archive, make_config, make_weights

from flora.adapter import pack_single_file, read_embedded_config
from flora_server.adapters.registry import (
    AdapterConflictError,
    AdapterRegistry,
    AdapterValidationError,
    StagedUpload,
)
from flora_server.adapters.store import (
    DigestMismatchError,
    InvalidAdapterIdError,
    LocalAdapterStore,
    StoredAdapterMissingError,
    UnsafePathError,
)
from flora_server.engine.protocol import AdapterLoadError, AdapterNotFoundError


def test_put_get_digest_list_delete(tmp_path):
    store = LocalAdapterStore(tmp_path / "s")
    data = b"abc" * 100
    stored = store.put("b1", io.BytesIO(data))
    assert stored.sha256 == hashlib.sha256(data).hexdigest() and stored.size_bytes == 300
    store.put("a1", io.BytesIO(b"x"))
    assert store.list() == ["a1", "b1"]
    assert store.get_bytes("b1") == data and store.digest("b1") == stored.sha256
    assert store.exists("b1") and not store.exists("zz") and not store.exists("../x")
    assert store.delete("b1") is True and store.delete("b1") is False
    assert store.list() == ["a1"]
    with pytest.raises(StoredAdapterMissingError):
        store.get_bytes("b1")


def test_put_with_wrong_digest_changes_nothing(tmp_path):
    store = LocalAdapterStore(tmp_path)
    store.put("a", io.BytesIO(b"old"))
    with pytest.raises(DigestMismatchError):
        store.put("a", io.BytesIO(b"new"), sha256="0" * 64)
    assert store.get_bytes("a") == b"old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_corruption_on_disk_is_detected(tmp_path):
    store = LocalAdapterStore(tmp_path)
    store.put("a", io.BytesIO(b"good bytes"))
    (tmp_path / "a.flora").write_bytes(b"evil bytes")
    with pytest.raises(DigestMismatchError):
        store.get_bytes("a")


@pytest.mark.parametrize(
    "bad", ["../etc", "..", "a..b", ".x", "a/../b", "a/b/c", "/a", "a/", "a/.b", "", "x" * 200]
)
def test_bad_ids_refused(tmp_path, bad):
    store = LocalAdapterStore(tmp_path)
    with pytest.raises(InvalidAdapterIdError):
        store.put(bad, io.BytesIO(b"x"))


def test_symlink_outside_root_refused(tmp_path):
    outside = tmp_path / "outside.flora"
    outside.write_bytes(b"secret")
    root = tmp_path / "store"
    store = LocalAdapterStore(root)
    os.symlink(outside, root / "evil.flora")
    with pytest.raises(UnsafePathError):
        store.get_bytes("evil")
    with pytest.raises(UnsafePathError):
        store.put("evil", io.BytesIO(b"overwrite"))
    assert outside.read_bytes() == b"secret"
    assert store.list() == [] and not store.exists("evil")


def test_pack_single_file_round_trip(tmp_path):
    (tmp_path / "c.json").write_bytes(make_config(rank=3))
    (tmp_path / "w.safetensors").write_bytes(make_weights(b"\x07" * 16))
    out = tmp_path / "out.flora"
    digest = pack_single_file(tmp_path / "c.json", tmp_path / "w.safetensors", out)
    blob = out.read_bytes()
    assert digest == hashlib.sha256(blob).hexdigest()
    header_len = int.from_bytes(blob[:8], "little")
    assert header_len % 8 == 0 and blob[8 + header_len :] == b"\x07" * 16
    assert read_embedded_config(out)["config"] == {"rank": 3}
    # The result is what the single-file form of the same adapter looks like.
    from safetensors import safe_open

    with safe_open(str(out), "np") as f:
        assert list(f.keys()) == ["flora.x.core"]
        assert f.get_tensor("flora.x.core").tobytes() == b"\x07" * 16


def _registry(tmp_path):
    reg = AdapterRegistry(LocalAdapterStore(tmp_path / "store"), tmp_path / "staging")

    def validator(path):
        if read_embedded_config(path)["config"]["rank"] > 8:
            raise AdapterValidationError("rank too large")
        return path.read_bytes()

    reg.set_validator(validator)
    return reg


def _staged(tmp_path, data: bytes) -> StagedUpload:
    p = tmp_path / f"up-{hashlib.sha256(data).hexdigest()[:8]}"
    p.write_bytes(data)
    return StagedUpload(archive=p, archive_sha256=hashlib.sha256(data).hexdigest())


def test_registry_put_load_conflict(tmp_path):
    reg = _registry(tmp_path)
    a, b = make_archive(b"\x00" * 16), make_archive(b"\x01" * 16)
    assert reg.put("x", _staged(tmp_path, a)).status == "created"
    assert reg.put("x", _staged(tmp_path, a)).status == "unchanged"
    with pytest.raises(AdapterConflictError):
        reg.put("x", _staged(tmp_path, b))
    assert reg.load("x").adapter == a
    assert reg.put("x", _staged(tmp_path, b), overwrite=True).status == "replaced"
    assert reg.load("x").adapter == b and reg.load_count("x") == 2
    with pytest.raises(AdapterNotFoundError):
        reg.load("missing")
    (tmp_path / "store" / "x.flora").write_bytes(a)  # corrupted behind our back
    with pytest.raises(AdapterLoadError):
        reg.load("x")


def test_registry_register_directory(tmp_path):
    reg = _registry(tmp_path)
    d = tmp_path / "my-adapter"
    d.mkdir()
    (d / "adapter_config.json").write_bytes(make_config())
    (d / "adapter.safetensors").write_bytes(make_weights())
    assert reg.register_directory("mine", d).status == "created"
    assert reg.list_ids() == ["mine"]
    (d / "adapter_config.json").write_bytes(make_config(rank=9))
    with pytest.raises(AdapterValidationError):
        reg.register_directory("mine", d)
