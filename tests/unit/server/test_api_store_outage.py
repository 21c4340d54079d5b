"""An adapter store that is down or stalled: every adapter route answers 503 + Retry-After
naming the store, in its family's error shape; the base model keeps answering promptly.

Down: a real `S3AdapterStore` (botocore included) whose endpoint refuses connections.
Stalled: a store whose calls block on an event, with a small `store_timeout`, and an engine
that tokenizes on asyncio's default executor as the real one does (so a store call parked
there would starve it).
"""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from api_fakes import FakeEngine, fake_validator, make_archive, running_app

from flora_server import main
from flora_server.adapters.registry import AdapterRegistry, AdapterStoreUnavailableError
from flora_server.adapters.s3_store import S3AdapterStore, S3StoreError
from flora_server.adapters.store import LocalAdapterStore, StoreUnavailableError
from flora_server.adapters.store_io import StoreExecutor
from flora_server.errors import engine_error_to_api
from flora_server.settings import Settings

SECRET = "wJalrXUtnFEMI-not-a-real-secret"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def aws_env(monkeypatch):
    for key, value in {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def down(tmp_path, aws_env):
    """A started app whose S3 endpoint refuses connections (one attempt per call: fast)."""
    lora_root = tmp_path / "loras"
    lora_root.mkdir()
    (lora_root / "a.flora").write_bytes(make_archive())
    port = _closed_port()
    with running_app(
        tmp_path,
        adapter_store="s3://flora-bucket/adapters",
        s3_endpoint_url=f"http://127.0.0.1:{port}",
        s3_max_attempts=1,
        lora_dirs=[str(lora_root)],
    ) as (client, engine):
        yield client, engine, lora_root, port


_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
# (method, path, json body or None, shape): every route that touches the store.
_ADAPTER_ROUTES = [
    ("GET", "/v1/adapters", None, "nested"),
    ("GET", "/v1/adapters/x", None, "nested"),
    ("DELETE", "/v1/adapters/x", None, "nested"),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"adapter_id": "x"}}, "flat"),
    ("POST", "/generate_stream", {"inputs": "hi", "parameters": {"adapter_id": "x"}}, "flat"),
    (
        "POST",
        "/generate",
        {"inputs": "hi", "parameters": {"merged_adapters": {"ids": ["x", "y"], "weights": [1, 1]}}},
        "flat",
    ),
    ("POST", "/v1/chat/completions", {"model": "x", **_CHAT}, "nested"),
    ("POST", "/v1/completions", {"model": "x", "prompt": "hi", "max_tokens": 2}, "nested"),
    ("GET", "/v1/models", None, "nested"),
    ("GET", "/v1/models/x", None, "nested"),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "a.flora"}, "nested"),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"}, "nested"),
    ("UPLOAD", "/v1/adapters", None, "nested"),
]


@pytest.mark.parametrize(("method", "path", "body", "shape"), _ADAPTER_ROUTES)
def test_every_adapter_route_is_503_naming_the_store_when_it_is_down(
    down, method, path, body, shape
):
    client, engine, _, port = down
    if method == "UPLOAD":
        files = {"archive": ("a.flora", make_archive())}
        r = client.post(path, data={"adapter_id": "x"}, files=files)
    else:
        r = client.request(method, path, json=body)
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"] == "5"
    error = r.json()
    if shape == "flat":  # TGI's shape: 503 is its `overloaded`
        assert error["error_type"] == "overloaded", error
        message = error["error"]
    else:
        assert error["error"]["type"] == "adapter_store_unavailable", error
        message = error["error"]["message"]
    # The store and the endpoint error's class; no address, bucket, key or credential.
    assert message == "the adapter store is unavailable: EndpointConnectionError", message
    for secret in (str(port), "127.0.0.1", "flora-bucket", SECRET, "AKIAEXAMPLEKEY"):
        assert secret not in r.text
    assert engine.requests == []  # refused before the engine


def test_a_store_outage_leaves_the_replica_ready_and_the_base_served(down):
    client, engine, _, _ = down
    assert client.get("/v1/adapters").status_code == 503
    # Ready: the base model (and cached adapters) still serve; an outage of the shared store
    # would otherwise take every replica, and the base model with them, out of the Service.
    assert client.get("/ready").status_code == 200
    r = client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200 and r.json()["generated_text"] == "hi"
    r = client.post("/v1/chat/completions", json={"model": engine.model_name, **_CHAT})
    assert r.status_code == 200, r.text


def test_botocore_errors_leave_the_s3_store_as_its_own_error(tmp_path, aws_env):
    """The store boundary: every method, the listing included (it used to let
    EndpointConnectionError through), raises S3StoreError."""
    from flora_server.adapters.s3_store import make_s3_client

    client = make_s3_client(f"http://127.0.0.1:{_closed_port()}", max_attempts=1)
    store = S3AdapterStore(client, "b", "p/", scratch_dir=tmp_path / "scratch")
    calls = [
        store.list,
        lambda: store.exists("x"),
        lambda: store.digest("x"),
        lambda: store.stat("x"),
        lambda: store.get_bytes("x"),
        lambda: store.read_prefix("x", 8),
        lambda: store.delete("x"),
        lambda: store.put("x", io.BytesIO(b"data")),
    ]
    for call in calls:
        with pytest.raises(S3StoreError) as info:
            call()
        assert isinstance(info.value, StoreUnavailableError)
        assert info.value.reason == "EndpointConnectionError"


def test_a_load_the_store_cannot_serve_is_503_not_a_broken_adapter(tmp_path):
    """The engine's load path: the registry raises an engine error that the API maps as a
    store outage (503), where a generic failure would be a 500 quoting the endpoint."""
    store = _StalledStore(LocalAdapterStore(tmp_path / "s"))
    store.inner.put("x", io.BytesIO(make_archive()))
    registry = AdapterRegistry(store, tmp_path / "up")
    registry.set_validator(fake_validator)
    store.fail = StoreUnavailableError("GET http://10.0.0.1/x: refused", reason="Refused")
    with pytest.raises(AdapterStoreUnavailableError) as info:
        registry.load("x")
    err = engine_error_to_api(info.value)
    assert (err.status, err.headers) == (503, {"Retry-After": "5"})
    assert err.message == "the adapter store is unavailable: Refused"


# -- a stalled store -------------------------------------------------------------------


class _StalledStore:
    """Delegates to a real store; while `stalled` is set every call blocks until `release`
    is set (a frozen endpoint); with `fail` set every call raises it. Counts calls."""

    def __init__(self, inner: LocalAdapterStore, executor: StoreExecutor | None = None) -> None:
        self.inner = inner
        self.executor = executor or inner.executor
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.fail: Exception | None = None
        self.calls = 0
        self.blocked = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.fail is not None:
                raise self.fail
            if self.stalled.is_set():
                self.blocked += 1
                self.release.wait()
            return method(*args, **kwargs)

        return call


class _ThreadTokenizingEngine(FakeEngine):
    """Tokenizes on asyncio's default executor, as `LLMEngine.tokenize` does, and gives
    that executor 4 threads (the default is min(32, cpus + 4): fewer than 8 on small
    machines), so a test can tell whether store calls are parked there."""

    def start(self) -> None:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(4))
        super().start()

    async def tokenize(self, text: str) -> list[int]:
        return await asyncio.to_thread(lambda: list(text.encode()))


@pytest.fixture
def stalled(tmp_path, monkeypatch) -> Iterator[tuple[Any, _StalledStore]]:
    store_timeout = 3.0
    inner = LocalAdapterStore(tmp_path / "store")
    inner.put("x", io.BytesIO(make_archive()))
    store = _StalledStore(inner, StoreExecutor(workers=2, timeout=store_timeout))
    monkeypatch.setattr(main, "open_store", lambda settings: store)

    def factory(settings: Settings, registry: AdapterRegistry, metrics: Any) -> Any:
        return _ThreadTokenizingEngine(registry), fake_validator

    settings = Settings(home=tmp_path / "home", store_timeout=store_timeout)
    app = main.create_app(settings, engine_factory=factory)
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        deadline = time.monotonic() + 5
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.01)
        try:
            yield client, store
        finally:
            store.release.set()  # let the parked store workers finish before shutdown


def _timed(client: Any, method: str, path: str, body: Any = None) -> tuple[int, float]:
    started = time.monotonic()
    r = client.request(method, path, json=body)
    return r.status_code, time.monotonic() - started


_BASE_GENERATE = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}


def test_a_stalled_store_delays_only_adapter_requests_and_they_end_in_503(stalled):
    client, store = stalled
    store.stalled.set()
    # The base model asks the store nothing.
    before = store.calls
    assert _timed(client, "POST", "/generate", _BASE_GENERATE)[0] == 200
    assert store.calls == before

    stuck = [
        ("GET", "/v1/adapters", None),
        ("GET", "/v1/models/x", None),
        ("POST", "/generate", {"inputs": "hi", "parameters": {"adapter_id": "x"}}),
        ("POST", "/v1/chat/completions", {"model": "x", **_CHAT}),
    ] * 2
    pool = ThreadPoolExecutor(len(stuck) + 2)
    try:
        adapter_calls = [pool.submit(_timed, client, *route) for route in stuck]
        deadline = time.monotonic() + 5
        while store.blocked < 2:  # both store workers parked: the stall has begun
            assert time.monotonic() < deadline
            time.sleep(0.01)
        base = [
            pool.submit(_timed, client, "POST", "/generate", _BASE_GENERATE),
            pool.submit(
                _timed, client, "POST", "/v1/chat/completions", {"model": "fake-base", **_CHAT}
            ),
        ]
        base_results = [f.result(timeout=10) for f in base]
        still_stuck = sum(not f.done() for f in adapter_calls)
        adapter_results = [f.result(timeout=10) for f in adapter_calls]
    finally:
        store.release.set()  # a failing run must not leave requests parked forever
        pool.shutdown(wait=True)
    # The base answers at once while the adapter requests are still waiting on the store.
    assert [status for status, _ in base_results] == [200, 200]
    assert max(seconds for _, seconds in base_results) < 2.0, base_results
    assert still_stuck >= 4, still_stuck
    # Every adapter request ends in 503 within the store timeout (plus scheduling slack),
    # not after the S3 client's retries or when the store comes back.
    assert [status for status, _ in adapter_results] == [503] * len(stuck), adapter_results
    assert max(seconds for _, seconds in adapter_results) < 3.0 + 3.0, adapter_results
    assert store.blocked == 2  # calls that found no free worker were dropped, never ran


def test_store_executor_drops_queued_calls_and_bounds_the_wait():
    asyncio.run(_executor_scenario())


async def _executor_scenario() -> None:
    executor = StoreExecutor(workers=1, timeout=0.2)
    gate = threading.Event()
    ran: list[str] = []

    def block() -> str:
        gate.wait()
        ran.append("block")
        return "late"

    try:
        first = asyncio.ensure_future(executor.run(block))
        second = asyncio.ensure_future(executor.run(lambda: ran.append("queued")))
        with pytest.raises(StoreUnavailableError, match=r"no answer within 0\.2 s"):
            await first
        with pytest.raises(StoreUnavailableError, match="all 1 store workers are busy"):
            await second
        # Unbounded: still refused when no worker frees up in time...
        with pytest.raises(StoreUnavailableError, match="busy"):
            await executor.run(lambda: "upload", bounded=False)
        gate.set()
        # ...but once it runs, it may take longer than the timeout.
        assert await executor.run(lambda: time.sleep(0.4) or "done", bounded=False) == "done"
        assert ran == ["block"]  # the queued call never ran
    finally:
        gate.set()
        executor.shutdown()


def test_settings_reach_the_store_and_the_s3_client(tmp_path, aws_env):
    from flora_server.adapters.open_store import open_store

    settings = Settings(
        home=tmp_path,
        adapter_store="s3://flora-bucket/p",
        s3_connect_timeout=1.5,
        s3_read_timeout=4,
        s3_max_attempts=2,
        store_timeout=7,
        store_workers=3,
    )
    store = open_store(settings)
    assert isinstance(store, S3AdapterStore)
    config = store.client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (1.5, 4)
    assert config.retries["total_max_attempts"] == 2
    assert (store.executor.workers, store.executor.timeout) == (3, 7)
    local = open_store(Settings(home=tmp_path, store_workers=5))
    assert isinstance(local, LocalAdapterStore) and local.executor.workers == 5


def test_the_store_executor_is_shut_down_with_the_app(tmp_path):
    """The app's shutdown refuses further store calls (queued ones are dropped), so no
    store worker outlives the server waiting for work."""
    with running_app(tmp_path) as (client, _):
        registry = client.app.state.registry
        assert asyncio.run(registry.call(lambda: "served")) == "served"
    with pytest.raises(StoreUnavailableError, match="shut down"):
        asyncio.run(registry.call(lambda: "after"))
