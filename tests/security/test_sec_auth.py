"""Properties 6 and 7: every route but the probes needs a key; management needs an admin
key; tenant-bound keys see only their own adapters (others' answer 404); no keys -> loopback
and a warning."""

from __future__ import annotations

import io
import time

import pytest
import torch
from api_fakes import fake_validator, make_archive, running_app
from fastapi.testclient import TestClient
from pydantic import ValidationError

from flora_server.auth import parse_key, startup_warnings
from flora_server.engine.encoder import EmbeddingResult
from flora_server.engine.protocol import EngineStats
from flora_server.engine.vision import Prediction
from flora_server.main import create_app
from flora_server.settings import Settings

OPEN_PATHS = {"/health", "/ready"}


def walk_routes(routes) -> list[tuple[str, set[str]]]:
    """(path, methods) of every route in `app.routes`, descending into included routers
    (FastAPI >= 0.160 keeps `include_router` results as nested route groups)."""
    out = []
    for route in routes:
        nested = getattr(route, "effective_candidates", None)
        if callable(nested):
            out += walk_routes(nested())
        elif getattr(route, "path", None) is not None:
            out.append((route.path, set(route.methods or {"GET"})))
    return out


def _concrete(path: str) -> str:
    return path.replace("{adapter_id}", "some-id")


@pytest.fixture
def keyed(tmp_path):
    with running_app(
        tmp_path,
        api_keys=["inf", "infA:tenantA", "infB:tenantB"],
        admin_keys=["adm", "admA:tenantA"],
        metrics_public=False,
    ) as pair:
        yield pair


def _upload(client, adapter_id: str, key: str):
    return client.post(
        "/v1/adapters",
        headers={"Authorization": f"Bearer {key}"},
        data={"adapter_id": adapter_id},
        files={"archive": ("a.flora", io.BytesIO(make_archive()))},
    )


def error_type(body: dict) -> str:
    """The error's type in either shape: nested, or TGI's flat one on the TGI routes."""
    return body["error_type"] if "error_type" in body else body["error"]["type"]


def test_every_route_but_probes_needs_a_key(keyed):
    client, _ = keyed
    routes = walk_routes(client.app.routes)
    checked = 0
    for route_path, methods in routes:
        for method in sorted(methods - {"HEAD"}):
            path = _concrete(route_path)
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
                r = client.request(method, path, headers=headers)
                if route_path in OPEN_PATHS:
                    assert r.status_code == 200, (method, path, r.status_code)
                else:
                    assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
                    assert r.headers["www-authenticate"] == "Bearer"
                    assert error_type(r.json()) == "authentication_error"
            checked += 1
    # The walk really covered the API (generate, openai, adapters, metrics, docs).
    assert checked >= 12
    paths = {p for p, _ in routes}
    assert {
        "/generate",
        "/v1/chat/completions",
        "/v1/adapters",
        "/metrics",
        "/openapi.json",
    } <= paths


def test_management_with_inference_key_is_403(keyed):
    client, _ = keyed
    for key in ("inf", "infA"):
        r = _upload(client, "tenantA.x", key)
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        h = {"Authorization": f"Bearer {key}"}
        assert client.get("/v1/adapters", headers=h).status_code == 403
        assert client.delete("/v1/adapters/tenantA.x", headers=h).status_code == 403
    assert client.get("/openapi.json", headers={"Authorization": "Bearer inf"}).status_code == 200


def test_metrics_public_flag(tmp_path):
    with running_app(tmp_path, api_keys=["k"], metrics_public=True) as (client, _):
        assert client.get("/metrics").status_code == 200
        assert client.post("/generate", json={"inputs": "x"}).status_code == 401


def test_tenants_see_and_use_only_their_adapters(keyed):
    client, _ = keyed
    assert _upload(client, "shared", "adm").status_code == 201
    assert _upload(client, "tenantA.one", "admA").status_code == 201
    assert _upload(client, "tenantB.two", "adm").status_code == 201
    # A tenant admin cannot create ids outside its namespace.
    r = _upload(client, "tenantB.evil", "admA")
    assert r.status_code == 403 and "tenantA." in r.json()["error"]["message"]

    def ids(key: str, route: str) -> list[str]:
        r = client.get(route, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        return sorted(m["id"] for m in r.json()["data"])

    assert ids("adm", "/v1/adapters") == ["shared", "tenantA.one", "tenantB.two"]
    assert ids("admA", "/v1/adapters") == ["tenantA.one"]
    assert ids("infA", "/v1/models") == ["fake-base", "tenantA.one"]
    assert ids("infB", "/v1/models") == ["fake-base", "tenantB.two"]
    assert ids("inf", "/v1/models") == ["fake-base", "shared", "tenantA.one", "tenantB.two"]

    def gen(key: str, adapter: str):
        return client.post(
            "/generate",
            headers={"Authorization": f"Bearer {key}"},
            json={"inputs": "hi", "parameters": {"adapter_id": adapter, "max_new_tokens": 2}},
        )

    assert gen("infA", "tenantA.one").status_code == 200
    missing = gen("infA", "no-such-adapter")
    for other in ("tenantB.two", "shared"):
        r = gen("infA", other)
        # Exactly the answer for an id that does not exist (apart from the id itself).
        assert r.status_code == 404 == missing.status_code
        assert r.json()["error_type"] == missing.json()["error_type"]  # TGI's flat shape
    chat = client.post(
        "/v1/chat/completions",
        headers={"Authorization": "Bearer infB"},
        json={"model": "tenantA.one", "messages": [{"role": "user", "content": "x"}]},
    )
    assert chat.status_code == 404
    assert gen("inf", "tenantB.two").status_code == 200  # unbound keys use everything
    h = {"Authorization": "Bearer admA"}
    assert client.get("/v1/adapters/tenantB.two", headers=h).status_code == 404
    assert client.delete("/v1/adapters/tenantB.two", headers=h).status_code == 404
    assert (
        client.get("/v1/adapters/tenantB.two", headers={"Authorization": "Bearer adm"}).status_code
        == 200
    )
    assert client.delete("/v1/adapters/tenantA.one", headers=h).status_code == 200


def test_key_parsing_and_settings():
    assert parse_key("k1:tenantA", "inference").tenant == "tenantA"
    assert parse_key("k1", "admin").tenant is None
    assert parse_key("a:b:t1", "inference").key == "a:b"
    with pytest.raises(ValueError):
        parse_key("k:bad tenant", "inference")
    s = Settings(api_keys="key1:tenantA,key2", admin_keys="adm")
    assert s.api_keys == ["key1:tenantA", "key2"]
    with pytest.raises(ValueError):
        Settings(api_keys="same", admin_keys="same:t")


@pytest.mark.parametrize(
    "key", ["ключ", "café", " lead", "trail ", "tab\tkey", "del\x7f", "nbsp\xa0"]
)
def test_keys_that_a_header_cannot_carry_are_refused(key):
    """The Authorization header is read as latin-1 and compared as UTF-8, its value
    stripped: a key outside printable ASCII, or with whitespace at an end or other than a
    space, could never authenticate."""
    with pytest.raises(ValueError, match="printable ASCII, spaces only inside"):
        parse_key(key, "inference")
    with pytest.raises(ValueError, match="printable ASCII"):
        parse_key(f"{key}:tenantA", "admin")
    for field in ("api_keys", "admin_keys", "metrics_keys"):
        with pytest.raises(ValidationError) as info:
            Settings(**{field: [key]})
        (error,) = info.value.errors()
        assert error["loc"] == (field,)  # the CLI names the flag and env from it
        assert key not in error["msg"]  # a key is a secret: never in a message
    printable = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != ":")
    assert parse_key(printable, "inference").key == printable


def test_no_keys_binds_loopback_and_warns():
    settings = Settings()
    assert settings.host == "127.0.0.1" and not settings.auth_enabled
    (warning,) = startup_warnings([], [], settings.host)
    assert "no API keys" in warning and "127.0.0.1" in warning
    (loud,) = startup_warnings([], [], "0.0.0.0")
    assert "anyone" in loud
    assert startup_warnings(["k"], [], "0.0.0.0") == []


class FakeEncoderEngine:
    """A text-encoder `BatchEngine` stand-in that records what reaches it: every vector is
    `[len(text), len(adapter_id or "")]`, and classify answers one label per text."""

    kind = "text-encoder"
    model_name = "fake-encoder"
    context_length = 64
    max_slots = 4

    def __init__(self) -> None:
        self.submitted: list[tuple[str | None, list[str]]] = []
        self.started = False

    @property
    def ready(self) -> bool:
        return self.started

    @property
    def healthy(self) -> bool:
        return True

    def start(self) -> None:
        self.started = True

    async def shutdown(self, timeout: float) -> None:
        self.started = False

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, (), (), self.max_slots, "idle")

    def invalidate_adapter(self, adapter_id: str) -> None:
        pass

    async def serve(self, adapter_id, inputs, options=None, *, timeout=None):  # type: ignore[no-untyped-def]
        """As BatchEngine.serve: the result and the served adapter's digest."""
        self.submitted.append((adapter_id, list(inputs)))
        sha256 = None if adapter_id is None else "0" * 64
        if options.task == "embed":
            rows = [[float(len(t)), float(len(adapter_id or ""))] for t in inputs]
            return EmbeddingResult(torch.tensor(rows), sum(len(t) for t in inputs)), sha256
        return [[Prediction(f"label-{adapter_id}", 0, 1.0)] for _ in inputs], sha256


@pytest.fixture
def keyed_encoder(tmp_path):
    holder: dict[str, FakeEncoderEngine] = {}

    def factory(settings, registry, metrics):  # type: ignore[no-untyped-def]
        holder["engine"] = FakeEncoderEngine()
        return holder["engine"], fake_validator

    settings = Settings(
        home=tmp_path / "home",
        api_keys=["inf", "infA:tenantA", "infB:tenantB"],
        admin_keys=["adm"],
    )
    with TestClient(create_app(settings, engine_factory=factory)) as client:
        for _ in range(200):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.01)
        yield client, holder["engine"]


def test_tenants_cannot_use_others_adapters_for_embeddings_or_classify(keyed_encoder):
    client, engine = keyed_encoder
    for adapter_id in ("shared", "tenantA.one", "tenantB.two"):
        assert _upload(client, adapter_id, "adm").status_code == 201

    def embed(key: str, adapter: str):
        return client.post(
            "/v1/embeddings",
            headers={"Authorization": f"Bearer {key}"},
            json={"input": ["abc"], "model": adapter},
        )

    def classify(key: str, adapter: str):
        return client.post(
            "/v1/classify",
            headers={"Authorization": f"Bearer {key}"},
            json={"inputs": ["abc"], "adapter_id": adapter},
        )

    def requests_of(adapter_id: str) -> int:
        r = client.get(f"/v1/adapters/{adapter_id}", headers={"Authorization": "Bearer adm"})
        assert r.status_code == 200, r.text
        return r.json()["request_count"]

    for call in (embed, classify):
        missing = call("infA", "no-such-adapter")
        assert missing.status_code == 404, missing.text
        for key, other in (("infA", "tenantB.two"), ("infA", "shared"), ("infB", "tenantA.one")):
            r = call(key, other)
            # Exactly the answer for an id that does not exist (apart from the id itself).
            assert r.status_code == 404, (call.__name__, key, other, r.text)
            assert r.json()["error"] == {
                **missing.json()["error"],
                "message": missing.json()["error"]["message"].replace("no-such-adapter", other),
            }
    # Nothing invisible or unknown reached the engine, and nothing was counted.
    assert engine.submitted == []
    assert [requests_of(a) for a in ("shared", "tenantA.one", "tenantB.two")] == [0, 0, 0]

    ok = embed("infA", "tenantA.one")
    assert ok.status_code == 200, ok.text
    assert ok.json()["data"][0]["embedding"] == [3.0, len("tenantA.one")]
    c = classify("infB", "tenantB.two")
    assert c.status_code == 200, c.text
    assert c.json()["results"][0][0]["label"] == "label-tenantB.two"
    assert embed("inf", "tenantB.two").status_code == 200  # unbound keys use everything
    assert classify("inf", "shared").status_code == 200
    assert embed("infA", "fake-encoder").status_code == 200  # the base is everyone's
    assert engine.submitted == [
        ("tenantA.one", ["abc"]),
        ("tenantB.two", ["abc"]),
        ("tenantB.two", ["abc"]),
        ("shared", ["abc"]),
        (None, ["abc"]),
    ]
    assert [requests_of(a) for a in ("shared", "tenantA.one", "tenantB.two")] == [1, 1, 2]


def test_a_key_with_a_space_inside_authenticates(tmp_path):
    """`Bearer a b` carries the key "a b": such keys worked before keys were checked at
    start-up and still do, on the inference routes and on /docs."""
    with running_app(tmp_path, api_keys=["my key"]) as (client, _):
        assert (
            client.get("/v1/models", headers={"Authorization": "Bearer my key"}).status_code == 200
        )
        assert client.get("/v1/models", headers={"Authorization": "Bearer my"}).status_code == 401
        assert client.get("/docs", headers={"Authorization": "Bearer my key"}).status_code == 200
