"""The store contract, run on both backends: a directory and S3 (moto's server on 127.0.0.1).

The same assertions hold for `LocalAdapterStore` and `S3AdapterStore`; the S3-only tests
check the commit protocol (weights first, manifest last) from a reader's point of view.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import threading
import uuid

import pytest

from flora_server.adapters.registry import AdapterRegistry
from flora_server.adapters.s3_store import S3AdapterStore, make_s3_client
from flora_server.adapters.store import (
    DigestMismatchError,
    InvalidAdapterIdError,
    LocalAdapterStore,
    StoredAdapterMissingError,
)

pytestmark = [pytest.mark.integration]

BUCKET = "flora-test"


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(monkeypatch):
    # Credentials come from the standard AWS environment, as in production.
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def s3_client(moto_endpoint, s3_env):
    client = make_s3_client(moto_endpoint)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=BUCKET)
    return client


def _s3_store(client, tmp_path, page_size=1000):
    # A fresh prefix per store: tests share the bucket but never each other's keys.
    prefix = f"t-{uuid.uuid4().hex[:12]}/adapters/"
    return S3AdapterStore(
        client, BUCKET, prefix, scratch_dir=tmp_path / "scratch", page_size=page_size
    )


@pytest.fixture(params=["local", "s3"])
def make_store(request, tmp_path):
    """A factory of stores that all share one backing location (two replicas' views)."""
    if request.param == "local":
        return lambda page_size=1000: LocalAdapterStore(tmp_path / "shared")
    client = request.getfixturevalue("s3_client")
    prefix = f"t-{uuid.uuid4().hex[:12]}/adapters/"
    return lambda page_size=1000: S3AdapterStore(
        client, BUCKET, prefix, scratch_dir=tmp_path / "scratch", page_size=page_size
    )


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_put_get_digest_stat_list_delete(make_store):
    store = make_store()
    data = b"abc" * 1000
    stored = store.put("b1", io.BytesIO(data))
    assert (stored.id, stored.sha256, stored.size_bytes) == ("b1", _sha(data), 3000)
    store.put("a-1", io.BytesIO(b"x"))
    store.put("a", io.BytesIO(b"y"))
    # id order, not key order ("a-1.json" sorts before "a.json" as keys)
    assert store.list() == ["a", "a-1", "b1"]
    assert store.get_bytes("b1") == data and store.digest("b1") == _sha(data)
    st = store.stat("b1")
    assert (st.sha256, st.size_bytes) == (_sha(data), 3000) and st.modified > 1.7e9
    with store.checkout("b1") as copy:
        assert copy.path.read_bytes() == data and copy.sha256 == _sha(data)
    assert not copy.path.exists()
    assert store.exists("b1") and not store.exists("zz") and not store.exists("../x")
    assert store.delete("b1") is True and store.delete("b1") is False
    assert store.list() == ["a", "a-1"] and not store.exists("b1")
    for read in (store.get_bytes, store.digest, store.stat):
        with pytest.raises(StoredAdapterMissingError):
            read("b1")


def test_overwrite_is_seen_by_another_view(make_store):
    writer, reader = make_store(), make_store()
    writer.put("x", io.BytesIO(b"v1"))
    assert reader.get_bytes("x") == b"v1"
    writer.put("x", io.BytesIO(b"v2"))
    assert reader.get_bytes("x") == b"v2" and reader.digest("x") == _sha(b"v2")
    writer.delete("x")
    assert not reader.exists("x") and reader.list() == []


def test_wrong_digest_changes_nothing(make_store):
    store = make_store()
    store.put("a", io.BytesIO(b"old"))
    with pytest.raises(DigestMismatchError):
        store.put("a", io.BytesIO(b"new"), sha256="0" * 64)
    assert store.get_bytes("a") == b"old" and store.list() == ["a"]
    store.put("b", io.BytesIO(b"new"), sha256=_sha(b"new").upper())
    assert store.get_bytes("b") == b"new"


@pytest.mark.parametrize(
    "bad", ["../etc", "..", "a..b", ".x", "a/../b", "a/b/c", "/a", "a/", "", "x" * 200]
)
def test_bad_ids_refused(make_store, bad):
    store = make_store()
    with pytest.raises(InvalidAdapterIdError):
        store.put(bad, io.BytesIO(b"x"))
    assert not store.exists(bad)


def test_listing_is_paged(make_store):
    store = make_store(page_size=2)
    ids = [f"ad{i}" for i in range(7)]
    for i in reversed(ids):
        store.put(i, io.BytesIO(i.encode()))
    assert store.list() == ids


def test_registry_replicas_see_each_others_changes(make_store, tmp_path):
    """Registry level: B loads what A stored, then reports it stale after A's overwrite and
    delete, which is what drives the server's invalidation."""
    regs = []
    for name in ("a", "b"):
        reg = AdapterRegistry(make_store(), tmp_path / f"staging-{name}")
        reg.set_validator(lambda path: path.read_bytes())
        regs.append(reg)
    a, b = regs
    a.store.put("x", io.BytesIO(b"v1"))
    assert b.exists("x") and b.load("x").adapter == b"v1" and b.stale_ids() == []
    a.store.put("x", io.BytesIO(b"v2"))
    assert b.stale_ids() == ["x"] and b.load("x").adapter == b"v2"
    assert a.delete("x") is True
    assert b.stale_ids() == ["x"] and not b.exists("x")


# -- S3 only: the commit protocol -----------------------------------------------------


def _keys(client, prefix):
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def test_s3_layout_and_no_orphans(s3_client, tmp_path):
    store = _s3_store(s3_client, tmp_path)
    p = store.prefix
    store.put("x", io.BytesIO(b"v1"))
    store.put("x", io.BytesIO(b"v2"))
    assert _keys(s3_client, p) == [f"{p}manifests/x.json", f"{p}objects/x/{_sha(b'v2')}.flora"]
    manifest = json.loads(
        s3_client.get_object(Bucket=BUCKET, Key=f"{p}manifests/x.json")["Body"].read()
    )
    assert manifest["sha256"] == _sha(b"v2") and manifest["size_bytes"] == 2
    store.delete("x")
    assert _keys(s3_client, p) == []
    assert list((tmp_path / "scratch").iterdir()) == []  # no leftover downloads


def test_s3_uncommitted_or_torn_writes_are_not_served(s3_client, tmp_path):
    store = _s3_store(s3_client, tmp_path)
    p = store.prefix
    # A writer that died after the weights, before the manifest: invisible.
    s3_client.put_object(Bucket=BUCKET, Key=f"{p}objects/ghost/{_sha(b'g')}.flora", Body=b"g")
    assert not store.exists("ghost") and store.list() == []
    with pytest.raises(StoredAdapterMissingError):
        store.get_bytes("ghost")
    # Weights replaced behind the manifest's back: refused, never served.
    store.put("x", io.BytesIO(b"good"))
    s3_client.put_object(Bucket=BUCKET, Key=f"{p}objects/x/{_sha(b'good')}.flora", Body=b"evil")
    with pytest.raises(DigestMismatchError):
        store.get_bytes("x")
    # A manifest that is not ours (wrong id inside, bad digest) does not count.
    s3_client.put_object(Bucket=BUCKET, Key=f"{p}manifests/y.json", Body=b'{"id": "z"}')
    assert not store.exists("y")
    # The next put of the ghost id cleans up the orphan.
    store.put("ghost", io.BytesIO(b"real"))
    assert _keys(s3_client, f"{p}objects/ghost/") == [f"{p}objects/ghost/{_sha(b'real')}.flora"]


def test_s3_readers_during_overwrites_see_whole_versions(s3_client, tmp_path):
    """Readers racing a writer get either version, whole, never an error or a mix."""
    writer = _s3_store(s3_client, tmp_path)
    reader = S3AdapterStore(s3_client, BUCKET, writer.prefix, scratch_dir=tmp_path / "r")
    versions = {bytes([i]) * 4096 for i in range(6)}
    writer.put("x", io.BytesIO(bytes([0]) * 4096))
    seen, errors, done = [], [], threading.Event()

    def read_loop():
        while not done.is_set():
            try:
                seen.append(reader.get_bytes("x"))
            except Exception as exc:
                errors.append(exc)

    thread = threading.Thread(target=read_loop)
    thread.start()
    for i in range(1, 6):
        writer.put("x", io.BytesIO(bytes([i]) * 4096))
    done.set()
    thread.join()
    assert errors == [] and seen and set(seen) <= versions
    assert reader.get_bytes("x") == bytes([5]) * 4096
