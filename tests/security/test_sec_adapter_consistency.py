"""Issue 14 items 2, 3 and 9 and `org/name` ids (issue 17), in process and fast:

- 2: no copy of replaced or deleted bytes is handed to a request admitted after the upload or
  delete answered (the cache's generation checks), and every result names the sha256 of the
  bytes that served it (`X-Adapter-Sha256`, `details.adapter_sha256`).
- 3: an overwrite is one atomic commit in both stores; a store left by a crash between the
  two renames of the earlier layout is repaired at start.
- 9: servers of two bases sharing one store each see only their own adapters.
- ids `org/name` everywhere, with no way out of the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from api_fakes import (
    FAKE_FINGERPRINT,
    fake_factory,
    make_archive,
    make_config,
    make_weights,
    read_adapter_config,
    sse_events,
)
from fastapi.testclient import TestClient

from flora_server.adapters import store as store_module
from flora_server.adapters.registry import AdapterValidationError
from flora_server.adapters.store import LocalAdapterStore
from flora_server.engine.adapter_cache import AdapterCache
from flora_server.engine.protocol import LoadedAdapter
from flora_server.main import create_app
from flora_server.settings import Settings

# -- item 2: the cache never hands out a copy older than the last invalidation ----------------


class _Runtime:
    """Records what each slot holds; `on_load` runs inside `load` (the race window)."""

    def __init__(self, slots: int) -> None:
        self.slots: list[str | None] = [None] * slots
        self.merged_slot = None
        self.on_load = None

    def check(self, adapter):
        pass  # every adapter here is servable

    def load(self, slot, adapter):
        if self.on_load is not None:
            hook, self.on_load = self.on_load, None
            hook()
        self.slots[slot] = adapter.name

    def unload(self, slot):
        self.slots[slot] = None

    def unmerge(self):
        self.merged_slot = None


class _VersionedSource:
    """Adapter `x` at version `version` (its 'sha256' is f"v{version}")."""

    def __init__(self) -> None:
        self.version = 1

    def load(self, adapter_id):
        v = self.version
        return LoadedAdapter(SimpleNamespace(name=f"{adapter_id}@v{v}", nbytes=10), f"v{v}")

    def exists(self, adapter_id):
        return True


def _place(cache, adapter_id):
    deadline = time.monotonic() + 5
    while (slot := cache.lookup(adapter_id)) is None:
        assert time.monotonic() < deadline, "never placed"
        time.sleep(0.002)
    return slot


def test_invalidation_while_placing_from_host_is_not_undone():
    """An overwrite lands while the worker places the host copy on a slot: that slot must
    not serve, and the old copy must not go back into the host cache (on main it did, and
    every later request ran on the old bytes until eviction)."""
    runtime, source = _Runtime(2), _VersionedSource()
    cache = AdapterCache(source, runtime, max_slots=2, host_bytes=10_000)
    slot = _place(cache, "x")
    assert (runtime.slots[slot], cache.slot_sha256(slot)) == ("x@v1", "v1")
    cache.invalidate("x")  # evicts the device copy; the host copy goes too
    cache.apply_invalidations()
    assert cache.host_adapters() == ()
    slot = _place(cache, "x")  # v1 again (store unchanged): back in host and on a slot
    cache.invalidate("y")
    cache.apply_invalidations()
    # Push x off the device (other adapters), keeping its host copy.
    for other in ("a", "b"):
        _place(cache, other)
    assert "x" not in runtime.slots and "x" in cache.host_adapters()

    def overwrite():  # the upload answers while the worker is inside runtime.load
        source.version = 2
        cache.invalidate("x")

    runtime.on_load = overwrite
    assert cache.lookup("x") is None  # the placed v1 copy is refused, not served
    assert "x" not in cache.host_adapters()
    slot = _place(cache, "x")
    assert (runtime.slots[slot], cache.slot_sha256(slot)) == ("x@v2", "v2")


def test_device_copy_of_old_generation_is_never_found_before_apply():
    runtime, source = _Runtime(2), _VersionedSource()
    cache = AdapterCache(source, runtime, max_slots=2, host_bytes=10_000)
    _place(cache, "x")
    source.version = 2
    cache.invalidate("x")  # not yet applied by the worker
    slot = _place(cache, "x")
    assert cache.slot_sha256(slot) == "v2" and runtime.slots[slot] == "x@v2"


# -- item 2 and 9 at the API: the served sha256, and two bases on one store ------------------


class _BaseValidator:
    """A fake validator for the base with fingerprint `fingerprint`, named `name`."""

    def __init__(self, fingerprint: str, name: str) -> None:
        self.fingerprint, self.base_name = fingerprint, name

    def __call__(self, path: Path) -> object:
        config = read_adapter_config(path)
        if config["base_model"]["fingerprint"] != self.fingerprint:
            raise AdapterValidationError("fingerprint does not match the base")
        return config

    def foreign_base(self, config: dict) -> str | None:
        base = config["base_model"]
        return None if base["fingerprint"] == self.fingerprint else base["id"]


OTHER_FINGERPRINT = "sha256:" + "ab" * 32


def _archive_for(fingerprint: str, base_id: str, values: bytes = b"\x00" * 16) -> bytes:
    config = json.loads(make_config(fingerprint))
    config["base_model"]["id"] = base_id
    return make_weights(values, {"adapter_config": json.dumps(config)})


@contextlib.contextmanager
def _app(home: Path, store: Path, fingerprint: str, name: str):
    holder: dict = {}
    base = fake_factory(holder)

    def factory(settings, registry, metrics):
        engine, _ = base(settings, registry, metrics)
        return engine, _BaseValidator(fingerprint, name)

    settings = Settings(home=home, adapter_store=str(store))
    with TestClient(create_app(settings, engine_factory=factory)) as client:
        for _ in range(200):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.01)
        yield client, holder["engine"]


def _upload(client, adapter_id, data, overwrite=False):
    return client.post(
        "/v1/adapters" + ("?overwrite=true" if overwrite else ""),
        data={"adapter_id": adapter_id},
        files={"archive": ("a.flora", io.BytesIO(data))},
    )


def test_every_inference_route_names_the_sha256_that_served_it(tmp_path):
    v1, v2 = make_archive(b"\x01" * 16), make_archive(b"\x02" * 16)
    with _app(tmp_path / "h", tmp_path / "store", FAKE_FINGERPRINT, "fake-base") as (client, _):
        assert _upload(client, "org/ad", v1).status_code == 201
        for data in (v1, v2):
            if data is v2:
                assert _upload(client, "org/ad", v2, overwrite=True).status_code == 200
            want = hashlib.sha256(data).hexdigest()
            gen = {"inputs": "hi", "parameters": {"adapter_id": "org/ad", "max_new_tokens": 3}}
            r = client.post("/generate", json=gen)
            assert r.headers["x-adapter-sha256"] == want
            assert r.json()["details"]["adapter_sha256"] == want
            r = client.post("/generate_stream", json=gen)
            assert r.headers["x-adapter-sha256"] == want
            assert sse_events(r.text)[-1]["details"]["adapter_sha256"] == want
            for path, body in (
                ("/v1/completions", {"model": "org/ad", "prompt": "hi", "max_tokens": 3}),
                (
                    "/v1/chat/completions",
                    {"model": "org/ad", "messages": [{"role": "user", "content": "hi"}]},
                ),
            ):
                r = client.post(path, json=body)
                assert r.status_code == 200, r.text
                assert r.headers["x-adapter-sha256"] == want
                assert r.json()["adapter_sha256"] == want
                r = client.post(path, json={**body, "stream": True})
                assert r.headers["x-adapter-sha256"] == want
                chunks = [e for e in sse_events(r.text) if e != "[DONE]"]
                assert chunks and all(c["adapter_sha256"] == want for c in chunks)
        r = client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
        assert "x-adapter-sha256" not in r.headers
        assert r.json()["details"]["adapter_sha256"] is None


def test_recreate_after_delete_invalidates_the_engine(tmp_path):
    """A delete + re-create (201) must reach the engine's caches too: on main only `replaced`
    invalidated, so copies and failed lookups cached since the delete survived."""
    with _app(tmp_path / "h", tmp_path / "store", FAKE_FINGERPRINT, "fake-base") as (c, engine):
        assert _upload(c, "x", make_archive(b"\x01" * 16)).status_code == 201
        engine.invalidated.clear()
        assert c.delete("/v1/adapters/x").status_code == 200
        assert _upload(c, "x", make_archive(b"\x02" * 16)).status_code == 201
        assert engine.invalidated == ["x", "x"]


def test_two_bases_on_one_store_see_only_their_own(tmp_path):
    store = tmp_path / "shared-store"
    llm_archive = make_archive(b"\x01" * 16)
    img_archive = _archive_for(OTHER_FINGERPRINT, "mnist-cnn", b"\x02" * 16)
    with (
        _app(tmp_path / "h1", store, FAKE_FINGERPRINT, "fake-base") as (llm, _),
        _app(tmp_path / "h2", store, OTHER_FINGERPRINT, "mnist-cnn") as (img, _),
    ):
        assert _upload(llm, "chat", llm_archive).status_code == 201
        assert _upload(img, "mnist", img_archive).status_code == 201
        assert [a["id"] for a in llm.get("/v1/adapters").json()["data"]] == ["chat"]
        assert [a["id"] for a in img.get("/v1/adapters").json()["data"]] == ["mnist"]
        assert [m["id"] for m in llm.get("/v1/models").json()["data"]][1:] == ["chat"]
        # Lookups of the other base's adapter: 4xx naming the base it was trained for.
        for r in (
            llm.get("/v1/adapters/mnist"),
            llm.delete("/v1/adapters/mnist"),
            llm.post("/generate", json={"inputs": "x", "parameters": {"adapter_id": "mnist"}}),
            llm.post("/v1/completions", json={"model": "mnist", "prompt": "x"}),
        ):
            assert r.status_code == 404, r.text
            assert "mnist-cnn" in r.text and "fake-base" in r.text
        # Never deleted or replaced through the other server.
        r = _upload(llm, "mnist", llm_archive, overwrite=True)
        assert r.status_code == 409 and "mnist-cnn" in r.json()["error"]["message"]
        r = img.get("/v1/adapters/mnist")
        assert (
            r.status_code == 200 and r.json()["sha256"] == hashlib.sha256(img_archive).hexdigest()
        )
        assert img.delete("/v1/adapters/mnist").status_code == 200
        assert llm.get("/v1/adapters/mnist").status_code == 404
        assert _upload(llm, "mnist", llm_archive).status_code == 201  # free for anyone now


# -- ids org/name ------------------------------------------------------------------------------


def test_org_name_ids_round_trip_and_never_leave_the_store(tmp_path):
    store = tmp_path / "store"
    with _app(tmp_path / "h", store, FAKE_FINGERPRINT, "fake-base") as (client, _):
        data = make_archive(b"\x05" * 16)
        assert _upload(client, "acme/summarise-v1", data).status_code == 201
        assert _upload(client, "acme", make_archive(b"\x06" * 16)).status_code == 201
        ids = [a["id"] for a in client.get("/v1/adapters").json()["data"]]
        assert ids == ["acme", "acme/summarise-v1"]
        r = client.get("/v1/adapters/acme/summarise-v1")
        assert r.status_code == 200 and r.json()["sha256"] == hashlib.sha256(data).hexdigest()
        assert (store / "acme" / "summarise-v1.flora").read_bytes() == data
        for bad in ("../evil", "acme/../evil", "acme/x/y", "/abs", "acme/.x", "a%2F..%2Fb"):
            r = _upload(client, bad, data)
            assert r.status_code == 422 and r.json()["error"]["param"] == "adapter_id", bad
        for path in ("acme/x/y", "acme/..%2Fx", "%2E%2E/x"):
            assert client.get(f"/v1/adapters/{path}").status_code in (404, 422), path
            assert client.delete(f"/v1/adapters/{path}").status_code in (404, 422), path
        # Deleting `acme` leaves `acme/summarise-v1` (and its object) alone.
        assert client.delete("/v1/adapters/acme").status_code == 200
        assert client.get("/v1/adapters/acme/summarise-v1").status_code == 200
        assert client.delete("/v1/adapters/acme/summarise-v1").status_code == 200
        assert client.get("/v1/adapters").json()["data"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert not [p for p in tmp_path.rglob("*evil*")] and not [p for p in tmp_path.rglob("abs*")]


# -- item 3: one atomic commit; the earlier layout's torn pair is repaired ---------------------


def test_crash_between_object_and_commit_leaves_the_old_adapter_whole(tmp_path, monkeypatch):
    store = LocalAdapterStore(tmp_path)
    store.put("a", io.BytesIO(b"old bytes"))

    class Killed(BaseException):
        pass

    for point in ("object-written", "committed"):

        def crash(name, point=point):
            if name == point:
                raise Killed

        monkeypatch.setattr(store_module, "crash_point", crash)
        with pytest.raises(Killed):
            store.put("a", io.BytesIO(f"new at {point}".encode()))
        monkeypatch.undo()
        after = LocalAdapterStore(tmp_path)  # the restart
        want = b"old bytes" if point == "object-written" else b"new at committed"
        assert after.get_bytes("a") == want
        assert after.digest("a") == hashlib.sha256(want).hexdigest() == after.stat("a").sha256
        store = after


def test_earlier_layout_torn_by_a_crash_is_repaired_at_start(tmp_path):
    """The earlier layout renamed the data file, then its digest file; a SIGKILL between
    the two left new bytes beside the old digest, and every read failed for good."""
    (tmp_path / "a.flora").write_bytes(b"new bytes")
    (tmp_path / "a.flora.sha256").write_text(hashlib.sha256(b"old bytes").hexdigest() + "\n")
    (tmp_path / "b.flora").write_bytes(b"b bytes")
    (tmp_path / "b.flora.sha256").write_text(hashlib.sha256(b"b bytes").hexdigest() + "\n")
    store = LocalAdapterStore(tmp_path)
    assert store.list() == ["a", "b"]
    assert store.get_bytes("a") == b"new bytes"
    assert store.digest("a") == hashlib.sha256(b"new bytes").hexdigest()
    assert store.get_bytes("b") == b"b bytes"
    assert not any(p.name.endswith(".sha256") for p in tmp_path.iterdir())
    assert os.path.islink(tmp_path / "a.flora")


def test_s3_crash_windows_and_org_name_keys(tmp_path, monkeypatch):
    moto = pytest.importorskip("moto")
    import boto3

    from flora_server.adapters.s3_store import S3AdapterStore

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with moto.mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="flora-test")
        store = S3AdapterStore(client, "flora-test", "p/", scratch_dir=tmp_path)
        store.put("a", io.BytesIO(b"old"))

        class Killed(BaseException):
            pass

        def crash(name):
            if name == "object-written":
                raise Killed

        monkeypatch.setattr("flora_server.adapters.s3_store.crash_point", crash)
        with pytest.raises(Killed):
            store.put("a", io.BytesIO(b"new"))
        monkeypatch.undo()
        assert (
            store.get_bytes("a") == b"old"
            and store.digest("a") == hashlib.sha256(b"old").hexdigest()
        )
        store.put("a", io.BytesIO(b"newer"))  # removes the orphan of the crashed put
        keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="flora-test")["Contents"])
        assert keys == [
            "p/manifests/a.json",
            f"p/objects/a/{hashlib.sha256(b'newer').hexdigest()}.flora",
        ]
        store.put("org/name", io.BytesIO(b"nested"))
        store.put("org", io.BytesIO(b"flat"))
        store.delete("org")  # must not touch objects/org/name/...
        assert store.list() == ["a", "org/name"] and store.get_bytes("org/name") == b"nested"
        assert store.read_prefix("org/name", 3) == (hashlib.sha256(b"nested").hexdigest(), b"nes")


def test_batch_engine_routes_report_the_sha256_from_the_engine(tmp_path):
    """Embeddings and text classification on a real (tiny) EncoderEngine: the digest comes
    from the copy on the job's slot, through `BatchEngine.serve`."""
    from test_encoder_engine import _factory, make_text_adapter

    from flora.adapter import encode_adapter

    app = create_app(Settings(home=tmp_path / "h"), engine_factory=_factory)
    with TestClient(app) as client:
        for _ in range(3000):  # up to 30 s on a loaded machine
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.01)
        archive, _ = encode_adapter(make_text_adapter(True), archive=True)
        r = client.post(
            "/v1/adapters", data={"adapter_id": "team/senti"}, files={"archive": ("a", archive)}
        )
        assert r.status_code == 201, r.text
        want = hashlib.sha256(archive).hexdigest()
        assert r.json()["sha256"] == want
        r = client.post("/v1/embeddings", json={"input": ["a b"], "model": "team/senti"})
        assert r.status_code == 200 and r.headers["x-adapter-sha256"] == want
        r = client.post("/v1/classify", json={"inputs": ["a b"], "adapter_id": "team/senti"})
        assert r.status_code == 200 and r.headers["x-adapter-sha256"] == want
        r = client.post("/v1/embeddings", json={"input": ["a b"]})
        assert r.status_code == 200 and "x-adapter-sha256" not in r.headers


def test_real_validators_of_two_bases_split_a_shared_store(tmp_path):
    """The real `BaseValidator.foreign_base` on two tiny Llamas (different weights, so
    different fingerprints) reading real adapter files from one directory store."""
    from tiny_engine import TinyLoaded, make_char_tokenizer, make_tiny_llama

    import flora
    from flora.adapter import save_adapter
    from flora.fingerprint import base_fingerprint
    from flora.serving import ServingModel
    from flora_server.adapters.registry import AdapterRegistry, StagedUpload
    from flora_server.adapters.validator import BaseSnapshot, BaseValidator
    from flora_server.engine.protocol import AdapterOfOtherBaseError

    registries = []
    for seed, name in ((0, "llama-a"), (1, "llama-b")):
        model = make_tiny_llama(seed=seed)
        loaded = TinyLoaded(
            model, make_char_tokenizer(), name=name, fingerprint=base_fingerprint(model)
        )
        reg = AdapterRegistry(LocalAdapterStore(tmp_path / "store"), tmp_path / f"staging-{name}")
        serving = ServingModel(make_tiny_llama(seed=seed), max_slots=1)  # the engine's rule
        reg.set_validator(BaseValidator(BaseSnapshot.of(loaded), serving.check))
        flora.inject(model, flora.FloraConfig(target_modules=["q_proj"], rank=2))
        path = save_adapter(model, tmp_path / f"ad-{name}", base_model_id=name, archive=True)
        upload = StagedUpload(
            archive=path, archive_sha256=hashlib.sha256(path.read_bytes()).hexdigest()
        )
        assert reg.put(f"for-{name}", upload).status == "created"
        registries.append(reg)
    a, b = registries
    assert a.list_ids() == ["for-llama-a"] and b.list_ids() == ["for-llama-b"]
    assert a.exists("for-llama-a") and not a.exists("for-llama-b")
    with pytest.raises(AdapterOfOtherBaseError, match=r"'llama-b'.*'llama-a'"):
        a.load("for-llama-b")
    with pytest.raises(AdapterOfOtherBaseError):
        a.delete("for-llama-b")
    assert b.load("for-llama-b").sha256 == b.store.digest("for-llama-b")


def test_recheck_revisits_an_id_after_this_replicas_own_overwrite(tmp_path):
    """A load racing this replica's own overwrite may have cached the old bytes; the store
    recheck must still look at the id afterwards (on main the put forgot it for good)."""
    from flora_server.adapters.registry import AdapterRegistry, StagedUpload

    reg = AdapterRegistry(LocalAdapterStore(tmp_path / "store"), tmp_path / "staging")
    reg.set_validator(lambda path: path.read_bytes())

    def staged(data: bytes) -> StagedUpload:
        path = tmp_path / hashlib.sha256(data).hexdigest()
        path.write_bytes(data)
        return StagedUpload(archive=path, archive_sha256=hashlib.sha256(data).hexdigest())

    v1, v2 = make_archive(b"\x01" * 16), make_archive(b"\x02" * 16)
    reg.put("x", staged(v1))
    assert reg.load("x").sha256 == hashlib.sha256(v1).hexdigest()
    reg.put("x", staged(v2), overwrite=True)
    assert reg.stale_ids() == ["x"] and reg.stale_ids() == []
    assert reg.load("x").sha256 == hashlib.sha256(v2).hexdigest() and reg.stale_ids() == []


def test_a_delete_racing_path_resolution_is_missing_not_an_error(tmp_path, monkeypatch):
    """os.path.realpath lstat()s a link, then readlink()s it: a delete in between made
    `exists` raise FileNotFoundError (a 500 on a generation request during the soak)."""
    store = LocalAdapterStore(tmp_path)
    store.put("a", io.BytesIO(b"x"))
    readlink = os.readlink

    def deleted_meanwhile(path, *args, **kwargs):
        if str(path).endswith("a.flora"):
            (tmp_path / "a.flora").unlink(missing_ok=True)  # the DELETE lands here
        return readlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "readlink", deleted_meanwhile)
    assert store.exists("a") is False
