"""Store selection, S3 url parsing, cross-process-safe local reads, and the store rechecker.

The S3 backend itself runs against moto's server in tests/integration/server/test_s3_store.py.
"""

from __future__ import annotations

import hashlib
import io
import time

import pytest
from pydantic import ValidationError

from flora_server.adapters.freshness import StoreRechecker
from flora_server.adapters.open_store import open_store
from flora_server.adapters.registry import AdapterRegistry
from flora_server.adapters.s3_store import S3AdapterStore, parse_s3_url
from flora_server.adapters.store import DigestMismatchError, LocalAdapterStore
from flora_server.settings import Settings


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://flora-adapters", ("flora-adapters", "")),
        ("s3://flora-adapters/", ("flora-adapters", "")),
        ("s3://b12/adapters", ("b12", "adapters/")),
        ("s3://my.bucket/a/b/", ("my.bucket", "a/b/")),
    ],
)
def test_parse_s3_url(url, expected):
    assert parse_s3_url(url) == expected


@pytest.mark.parametrize("url", ["s3://", "s3://AB/x", "s3://b/../x", "s3://bk/a//b", "http://b/x"])
def test_parse_s3_url_refuses(url):
    with pytest.raises(ValueError):
        parse_s3_url(url)


def test_settings_pick_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    local = Settings(home=tmp_path, adapter_store=str(tmp_path / "shared"))
    assert local.adapter_store_url is None and local.store_recheck_seconds == 2.0
    store = open_store(local)
    assert isinstance(store, LocalAdapterStore) and store.root == (tmp_path / "shared").resolve()

    s3 = Settings(
        home=tmp_path, adapter_store="s3://flora-adapters/prod", s3_endpoint_url="http://h:9"
    )
    assert s3.adapter_store_url == "s3://flora-adapters/prod"
    assert s3.adapter_store_dir == tmp_path / "s3-scratch"
    store = open_store(s3)
    assert isinstance(store, S3AdapterStore)
    assert (store.bucket, store.prefix) == ("flora-adapters", "prod/")
    assert store.client.meta.endpoint_url == "http://h:9"

    monkeypatch.setenv("FLORA_ADAPTER_STORE", "s3://flora-adapters/x")
    monkeypatch.setenv("FLORA_STORE_RECHECK_SECONDS", "0.5")
    env = Settings()
    assert env.adapter_store_url == "s3://flora-adapters/x" and env.store_recheck_seconds == 0.5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"adapter_store": "s3://UPPER/x"},
        {"adapter_store": "gs://bucket/x"},
        {"store_recheck_seconds": 0},
    ],
)
def test_bad_store_settings(kwargs):
    with pytest.raises(ValidationError):
        Settings(**kwargs)


def test_local_checkout_rides_out_an_overwrite_between_resolve_and_open(tmp_path):
    """Another process committed an overwrite and removed the old object after this reader
    resolved the link: the reader resolves again and returns the new bytes with their
    digest, not an error and not a mix."""
    store = LocalAdapterStore(tmp_path)
    store.put("a", io.BytesIO(b"old bytes"))
    resolve = store._resolve
    calls = []

    def racing_resolve(adapter_id):
        found = resolve(adapter_id)
        if not calls:  # the other process's put lands right after this resolve
            LocalAdapterStore(tmp_path).put("a", io.BytesIO(b"new bytes"))
        calls.append(found)
        return found

    store._resolve = racing_resolve
    with store.checkout("a") as copy:
        assert copy.path.read_bytes() == b"new bytes"
        assert copy.sha256 == hashlib.sha256(b"new bytes").hexdigest() and copy.size_bytes == 9
        # A private copy: a later put cannot change what the caller is reading.
        store.put("a", io.BytesIO(b"newer"))
        assert copy.path.read_bytes() == b"new bytes"
    assert calls[0][0] == hashlib.sha256(b"old bytes").hexdigest()  # resolved, then gone
    assert calls[1][0] == hashlib.sha256(b"new bytes").hexdigest()
    assert not copy.path.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_local_checkout_reports_real_corruption(tmp_path):
    store = LocalAdapterStore(tmp_path)
    store.put("a", io.BytesIO(b"good"))
    (tmp_path / "a.flora").write_bytes(b"evil")
    with pytest.raises(DigestMismatchError), store.checkout("a"):
        pass
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def _two_replicas(tmp_path):
    """Two registries on one directory: what two server processes see."""
    regs = []
    for name in ("a", "b"):
        reg = AdapterRegistry(LocalAdapterStore(tmp_path / "store"), tmp_path / f"staging-{name}")
        reg.set_validator(lambda path: path.read_bytes())
        regs.append(reg)
    return regs


def test_stale_ids_after_delete_and_overwrite_elsewhere(tmp_path):
    a, b = _two_replicas(tmp_path)
    a.store.put("x", io.BytesIO(b"v1"))
    a.store.put("y", io.BytesIO(b"y1"))
    assert b.load("x").adapter == b"v1" and b.load("y").adapter == b"y1"
    assert b.stale_ids() == []
    a.store.put("x", io.BytesIO(b"v2"))  # overwrite through A
    assert b.stale_ids() == ["x"]
    assert b.stale_ids() == []  # reported once
    assert b.load("x").adapter == b"v2" and b.stale_ids() == []
    a.delete("y")
    assert b.stale_ids() == ["y"]
    # Overwritten and put back as it was: the bytes B holds are current again.
    a.store.put("x", io.BytesIO(b"v3"))
    a.store.put("x", io.BytesIO(b"v2"))
    assert b.stale_ids() == []


def test_exists_caches_positive_answers_only_and_own_writes_are_immediate(tmp_path):
    store = LocalAdapterStore(tmp_path / "s")
    reg = AdapterRegistry(store, tmp_path / "st", exists_ttl=0.2)
    reg.set_validator(lambda path: path.read_bytes())
    other = LocalAdapterStore(tmp_path / "s")
    assert reg.exists("x") is False
    other.put("x", io.BytesIO(b"1"))  # uploaded through another replica
    assert reg.exists("x") is True  # a miss is never cached: visible at once
    assert set(reg._exists_cache) == {"x"}
    other.delete("x")
    assert reg.exists("x") is True  # a hit is reused within the ttl...
    time.sleep(0.25)
    assert reg.exists("x") is False  # ...and re-asked after it
    for n in range(50):
        assert reg.exists(f"unknown-{n}") is False
    assert reg._exists_cache == {}  # unknown ids do not grow the cache
    other.put("y", io.BytesIO(b"2"))
    assert reg.exists("y") is True
    reg.delete("y")
    assert reg.exists("y") is False  # own delete: at once


class _Source:
    def __init__(self, batches):
        self.batches = list(batches)

    def stale_ids(self):
        if not self.batches:
            return []
        batch = self.batches.pop(0)
        if isinstance(batch, Exception):
            raise batch
        return batch


def test_rechecker_invalidates_and_survives_errors():
    seen: list[str] = []
    source = _Source([["a"], RuntimeError("store down"), ["b", "c"]])
    checker = StoreRechecker(source, 0.02, seen.append)
    checker.start()
    deadline = time.monotonic() + 5
    while seen != ["a", "b", "c"] and time.monotonic() < deadline:
        time.sleep(0.01)
    checker.stop()
    assert seen == ["a", "b", "c"]
    assert checker.passes >= 2  # the failed pass did not count, the others did
    with pytest.raises(ValueError):
        StoreRechecker(source, 0, seen.append)
