"""X-Request-Id, the JSON access log and OpenTelemetry spans, on the fake engine."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import pytest
from api_fakes import expected_text, make_archive, running_app, sse_events

from flora_server.metrics import ServerMetrics
from flora_server.observability import (
    JsonFormatter,
    RequestIdFilter,
    accept_request_id,
    configure_logging,
    tenant_hash,
)
from flora_server.tracing import build_tracing

GEN = {"inputs": "hello", "parameters": {"max_new_tokens": 4}}


class _Lines:
    """The JSON lines written so far to a stream."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[dict]:
        return iter([json.loads(line) for line in self.stream.getvalue().splitlines()])


@pytest.fixture
def access_lines() -> Iterator[_Lines]:
    """The JSON lines the `flora_server` loggers write while the test runs."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("flora_server")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield _Lines(stream)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _access(lines: _Lines, request_id: str) -> dict:
    found = [x for x in lines if x["logger"] == "flora_server.access"]
    return next(x for x in found if x["request_id"] == request_id)


def test_accept_request_id_bounds_length_and_charset() -> None:
    assert accept_request_id("abc-DEF_1.2:3") == "abc-DEF_1.2:3"
    assert accept_request_id("a" * 128) == "a" * 128
    for bad in ("a" * 129, "has space", "-leading", "", "x\r\nSet-Cookie: y", "é"):
        generated = accept_request_id(bad)
        assert generated != bad and len(generated) == 32 and int(generated, 16) >= 0
    assert accept_request_id(None) != accept_request_id(None)
    assert tenant_hash("acme") == tenant_hash("acme") != tenant_hash("acme2")
    assert "acme" not in tenant_hash("acme") and tenant_hash(None) is None


def test_request_id_round_trips_and_reaches_the_engine_and_the_json_log(
    tmp_path, access_lines
) -> None:
    with running_app(tmp_path) as (client, engine):
        r = client.post("/generate", json=GEN, headers={"X-Request-Id": "req-plain-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "req-plain-1"
        assert engine.requests[-1].request_id == "gen-req-plain-1"

        with client.stream(
            "POST", "/generate_stream", json=GEN, headers={"X-Request-Id": "req-stream-1"}
        ) as s:
            assert s.headers["x-request-id"] == "req-stream-1"
            events = sse_events(s.read().decode())
        assert events[-1]["generated_text"] == expected_text("hello", None, 4)

        chat = {"model": "fake-base", "messages": [{"role": "user", "content": "hi"}]}
        r = client.post(
            "/v1/chat/completions",
            json={**chat, "stream": True, "max_tokens": 3},
            headers={"X-Request-Id": "req-chat-1"},
        )
        assert r.headers["x-request-id"] == "req-chat-1"
        assert sse_events(r.text)[0]["id"] == "chatcmpl-req-chat-1"

        # Errors carry it too: a 422 from validation, a 404 from the router, an invalid id.
        r = client.post("/generate", json={"inputs": ""}, headers={"X-Request-Id": "req-bad-1"})
        assert r.status_code == 422 and r.headers["x-request-id"] == "req-bad-1"
        r = client.get("/nothing-here", headers={"X-Request-Id": "bad id"})
        generated = r.headers["x-request-id"]
        assert r.status_code == 404 and generated != "bad id" and len(generated) == 32
        assert r.json()["error"]["type"] == "not_found_error"
    plain = _access(access_lines, "req-plain-1")
    assert plain["route"] == "/generate" and plain["status"] == 200
    assert (plain["prompt_tokens"], plain["generated_tokens"]) == (5, 4)
    assert plain["finish_reason"] == "length" and plain["adapter"] is None
    assert 0 <= plain["ttft_s"] <= plain["total_s"]
    stream = _access(access_lines, "req-stream-1")
    assert (stream["route"], stream["status"], stream["generated_tokens"]) == (
        "/generate_stream",
        200,
        4,
    )
    assert _access(access_lines, "req-chat-1")["generated_tokens"] == 3
    bad = _access(access_lines, "req-bad-1")
    assert bad["status"] == 422 and bad["generated_tokens"] is None
    assert _access(access_lines, generated)["route"] == "unmatched"


def test_access_log_names_adapter_cold_then_warm_and_hashes_the_tenant(
    tmp_path, access_lines
) -> None:
    keys = {"api_keys": ["sk-t:acme"], "admin_keys": ["sk-admin"]}
    with running_app(tmp_path, **keys) as (client, _):
        admin = {"Authorization": "Bearer sk-admin"}
        up = client.post(
            "/v1/adapters",
            data={"adapter_id": "acme.a1"},
            files={"archive": ("a.flora", make_archive())},
            headers=admin,
        )
        assert up.status_code in (200, 201), up.text
        body = {"inputs": "hi", "parameters": {"max_new_tokens": 2, "adapter_id": "acme.a1"}}
        for rid in ("cold-1", "warm-1"):
            auth = {"Authorization": "Bearer sk-t", "X-Request-Id": rid}
            assert client.post("/generate", json=body, headers=auth).status_code == 200
        r = client.post("/generate", json=body, headers={"X-Request-Id": "noauth-1"})
        assert r.status_code == 401 and r.headers["x-request-id"] == "noauth-1"
    cold, warm = _access(access_lines, "cold-1"), _access(access_lines, "warm-1")
    assert (cold["adapter"], cold["cold"], warm["cold"]) == ("acme.a1", True, False)
    assert cold["tenant"] == tenant_hash("acme") and 'acme"' not in json.dumps(cold)
    assert _access(access_lines, "noauth-1")["status"] == 401


def test_json_log_lines_carry_the_request_id(tmp_path, capsys) -> None:
    configure_logging("info", "json")
    try:
        with running_app(tmp_path) as (client, _):
            client.post("/generate", json=GEN, headers={"X-Request-Id": "json-1"})
    finally:
        for handler in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(handler)
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    access = [x for x in lines if x["logger"] == "flora_server.access"]
    assert [x["request_id"] for x in access if x["route"] == "/generate"] == ["json-1"]
    assert {"time", "level", "message", "queue_s", "ttft_s", "total_s"} <= set(access[0])


def test_tracing_is_off_without_an_endpoint_and_spans_cover_the_phases(tmp_path) -> None:
    assert build_tracing(None) is None and build_tracing("") is None
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from flora_server.tracing import Tracing

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with running_app(tmp_path) as (client, engine):
        client.app.state.tracing = Tracing(provider.get_tracer("test"))
        generate = engine.generate

        def admitted_later(request):  # the fake engine has no queue: say when it "admitted"
            request.admitted_at = time.monotonic() + 0.002
            return generate(request)

        engine.generate = admitted_later
        engine.token_delay = 0.01  # the first token comes after the admission
        parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        headers = {"X-Request-Id": "trace-1", "traceparent": parent}
        assert client.post("/generate", json=GEN, headers=headers).status_code == 200
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans["POST /generate"]
    assert root.attributes["flora.request_id"] == "trace-1"
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["flora.generated_tokens"] == 4
    assert format(root.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    for name in ("queue", "prefill", "decode"):
        assert spans[name].parent.span_id == root.context.span_id, name
        assert root.start_time <= spans[name].start_time <= spans[name].end_time
    assert spans["queue"].end_time == spans["prefill"].start_time
    assert spans["prefill"].end_time == spans["decode"].start_time <= root.end_time
    assert "adapter_load" not in spans  # no adapter: nothing to load


def test_placement_gauges_on_metrics(tmp_path) -> None:
    metrics = ServerMetrics()
    from flora_server.engine.protocol import EngineStats

    stats = EngineStats(2, 3, ("a",), ("b",), 4, "batched", ("a", "c"), ("a", "b", "d"), 0.25)
    metrics.bind_engine_stats(lambda: stats, "base-x")
    text = metrics.render().decode()
    expected = [
        'flora_kv_cache_usage_perc{model_name="base-x"} 0.25',
        'vllm:num_requests_waiting{model_name="base-x"} 3.0',
        'vllm:num_requests_running{model_name="base-x"} 2.0',
        'vllm:kv_cache_usage_perc{model_name="base-x"} 0.25',
        'flora_lora_adapter_loaded{adapter="c",model_name="base-x",tier="device"} 1.0',
        'flora_lora_adapter_loaded{adapter="d",model_name="base-x",tier="host"} 1.0',
    ]
    for line in expected:
        assert line in text.splitlines(), line
    resident = [x for x in text.splitlines() if x.startswith("flora_lora_adapter_loaded{")]
    assert len(resident) == 5  # a, c on device; a, b, d in the host cache
    assert "process_resident_memory_bytes" in text and "python_info{" in text


def test_an_unhandled_error_is_a_json_500_with_the_request_id(tmp_path, access_lines) -> None:
    with running_app(tmp_path) as (client, _):

        def boom() -> None:
            raise RuntimeError("a bug")

        client.app.add_api_route("/boom", boom)
        r = client.get("/boom", headers={"X-Request-Id": "boom-1"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "boom-1"
    assert r.json() == {"error": {"type": "server_error", "message": "internal server error"}}
    lines = list(access_lines)
    errors = [x for x in lines if x["logger"] == "flora_server.observability"]
    assert errors[0]["request_id"] == "boom-1" and "RuntimeError: a bug" in errors[0]["exception"]
    assert _access(access_lines, "boom-1")["status"] == 500
