"""/health, /ready, /metrics, OpenAPI, Bearer auth, and start-up states."""

from __future__ import annotations

import io
import threading
import time

import pytest
from api_fakes import FakeEngine, fake_validator, make_archive, running_app
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from flora_server.main import create_app
from flora_server.settings import Settings


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_ready_is_503_until_loaded_health_always_200(tmp_path):
    gate = threading.Event()

    def slow_factory(settings, registry, metrics):
        gate.wait(5)
        return FakeEngine(registry), fake_validator

    app = create_app(Settings(home=tmp_path), engine_factory=slow_factory)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        r = client.post("/generate", json={"inputs": "x"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert (
            client.post(
                "/v1/adapters",
                data={"adapter_id": "a"},
                files={"archive": ("a", io.BytesIO(make_archive()))},
            ).status_code
            == 503
        )
        gate.set()
        for _ in range(200):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.01)
        assert client.get("/ready").json() == {"status": "ready", "model": "fake-base"}


def test_startup_failure_is_reported_by_ready(tmp_path):
    def broken(settings, registry, metrics):
        raise RuntimeError("no such model")

    with TestClient(create_app(Settings(home=tmp_path), engine_factory=broken)) as client:
        for _ in range(100):
            r = client.get("/ready")
            if "no such model" in r.text:
                break
            time.sleep(0.01)
        assert r.status_code == 503 and "no such model" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 200


def test_openapi_and_docs(tmp_path):
    with running_app(tmp_path) as (client, _):
        spec = client.get("/openapi.json").json()
        assert {
            "/generate",
            "/generate_stream",
            "/v1/completions",
            "/v1/chat/completions",
            "/v1/models",
            "/v1/adapters",
            "/v1/adapters/{adapter_id}",
            "/health",
            "/ready",
            "/metrics",
        } <= set(spec["paths"])
        upload = spec["paths"]["/v1/adapters"]["post"]["requestBody"]["content"]
        assert "multipart/form-data" in upload
        assert client.get("/docs").status_code == 200


def test_unknown_route_and_method_are_json(tmp_path):
    with running_app(tmp_path) as (client, _):
        r = client.get("/nope")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = client.get("/generate")
        assert r.status_code == 405 and "error" in r.json()


@pytest.fixture
def keyed(tmp_path):
    with running_app(tmp_path, api_keys=["inf"], admin_keys=["adm"], metrics_public=False) as p:
        yield p


def test_auth_inference_admin_and_open_routes(keyed):
    client, _ = keyed
    inf = {"Authorization": "Bearer inf"}
    adm = {"Authorization": "Bearer adm"}
    body = {"inputs": "x", "parameters": {"max_new_tokens": 1}}
    assert client.post("/generate", json=body).status_code == 401
    assert (
        client.post("/generate", json=body, headers={"Authorization": "Bearer zz"}).status_code
        == 401
    )
    assert client.post("/generate", json=body, headers=inf).status_code == 200
    assert client.post("/generate", json=body, headers=adm).status_code == 200
    assert client.get("/v1/models", headers=inf).status_code == 200
    assert client.get("/v1/adapters").status_code == 401
    r = client.get("/v1/adapters", headers=inf)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert client.get("/v1/adapters", headers=adm).status_code == 200
    r = client.post(
        "/v1/adapters",
        headers=inf,
        data={"adapter_id": "a"},
        files={"archive": ("a", io.BytesIO(make_archive()))},
    )
    assert r.status_code == 403
    assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
    assert client.get("/metrics").status_code == 401
    # Metrics labels name every adapter: an inference key may not read them, an admin may.
    assert client.get("/metrics", headers=inf).status_code == 403
    assert client.get("/metrics", headers=adm).status_code == 200


def test_metrics_expose_latency_by_adapter_and_lora_info(tmp_path):
    with running_app(tmp_path, metrics_top_adapters=1) as (client, engine):
        for name in ("hot", "cold"):
            r = client.post(
                "/v1/adapters",
                data={"adapter_id": name},
                files={"archive": ("a", io.BytesIO(make_archive()))},
            )
            assert r.status_code == 201
        for adapter, n in (("hot", 2), ("cold", 1), (None, 1)):
            for _ in range(n):
                client.post(
                    "/generate",
                    json={
                        "inputs": "abc",
                        "parameters": {"adapter_id": adapter, "max_new_tokens": 3},
                    },
                )
        engine.running = ["hot", "hot"]
        text = client.get("/metrics").text
        s = metric_samples(text)
        # top-1 adapter keeps its label, the other is "other", no adapter is "base".
        assert s[("flora_time_to_first_token_seconds_count", (("adapter", "hot"),))] == 2
        assert s[("flora_time_to_first_token_seconds_count", (("adapter", "other"),))] == 1
        assert s[("flora_time_to_first_token_seconds_count", (("adapter", "base"),))] == 1
        assert ("flora_time_to_first_token_seconds_count", (("adapter", "cold"),)) not in s
        assert s[("flora_inter_token_latency_seconds_count", (("adapter", "hot"),))] == 4
        assert s[("flora_request_latency_seconds_count", (("adapter", "hot"),))] == 2
        assert s[("flora_generated_tokens_total", (("adapter", "hot"),))] == 6
        assert (
            s[
                (
                    "flora_http_requests_total",
                    (("method", "POST"), ("route", "/generate"), ("status", "200")),
                )
            ]
            == 4
        )
        labels = (
            ("max_lora", "4"),
            ("running_lora_adapters", "hot"),
            ("waiting_lora_adapters", ""),
        )
        for name in ("flora_lora_requests_info", "vllm:lora_requests_info"):
            assert abs(s[(name, labels)] - time.time()) < 60
        assert s[("flora_running_batch_size", ())] == 2
        assert s[("flora_queue_length", ())] == 0


def test_engine_hooks_feed_metrics(tmp_path):
    with running_app(tmp_path) as (client, _):
        m = client.app.state.metrics
        m.on_step("batched", 3, 0.01)
        m.on_step("merged", 1, 0.01)
        m.on_cache_hit("host")
        m.on_cache_miss()
        m.on_cache_eviction("device")
        m.on_adapter_load("a", 0.2, True)
        s = metric_samples(client.get("/metrics").text)
        assert s[("flora_engine_steps_total", (("mode", "batched"),))] == 1
        assert s[("flora_engine_step_batch_size_sum", (("mode", "batched"),))] == 3
        assert s[("flora_adapter_cache_hits_total", (("tier", "host"),))] == 1
        assert s[("flora_adapter_cache_misses_total", ())] == 1
        assert s[("flora_adapter_cache_evictions_total", (("tier", "device"),))] == 1
        assert s[("flora_adapter_load_seconds_sum", (("result", "ok"),))] == pytest.approx(0.2)


def test_docs_routes_are_counted_under_their_own_route(tmp_path):
    with running_app(tmp_path) as (client, _):
        for path in ("/openapi.json", "/docs", "/redoc", "/no-such-route"):
            client.get(path)
        s = metric_samples(client.get("/metrics").text)
        routes = {
            dict(labels)["route"]
            for (name, labels) in s
            if name == "flora_http_requests_total" and dict(labels)["method"] == "GET"
        }
        assert {"/openapi.json", "/docs", "/redoc", "unmatched"} <= routes
        unmatched = (("method", "GET"), ("route", "unmatched"), ("status", "404"))
        assert s[("flora_http_requests_total", unmatched)] == 1  # only /no-such-route


def test_invented_methods_add_no_metric_series(tmp_path):
    """Any token is a valid HTTP method: a client inventing them must not add series to
    /metrics (each would stay forever); they count as "other"."""
    with running_app(tmp_path) as (client, _):
        for i in range(5):
            client.request(f"ZZMETH{i}", "/health")
            client.request(f"ZZ{i}" * 100, "/no-such-route")
        client.request("DELETE", "/health")
        s = metric_samples(client.get("/metrics").text)
        methods = {
            dict(labels)["method"] for (name, labels) in s if name == "flora_http_requests_total"
        }
        assert methods == {"GET", "DELETE", "other"}, methods
        other = (("method", "other"), ("route", "/health"), ("status", "405"))
        assert s[("flora_http_requests_total", other)] == 5
