"""/generate and /generate_stream against the fake engine."""

from __future__ import annotations

import io

import pytest
from api_fakes import (
    expected_text,
    held_back_then_eos,
    make_archive,
    running_app,
    scripted,
    sse_events,
)


@pytest.fixture
def app(tmp_path):
    with running_app(tmp_path) as pair:
        yield pair


def upload(client, adapter_id: str, data: bytes | None = None) -> None:
    r = client.post(
        "/v1/adapters",
        data={"adapter_id": adapter_id},
        files={"archive": ("a.flora", io.BytesIO(data or make_archive()))},
    )
    assert r.status_code == 201, r.text


def test_generate_base_exact_text_and_details(app):
    client, engine = app
    r = client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 7}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["generated_text"] == expected_text("hello", None, 7) == "hellohe"
    assert body["details"] == {
        "finish_reason": "length",
        "generated_tokens": 7,
        "prompt_tokens": 5,
        "skipped_tokens": 0,
        "seed": None,
        "adapter_id": None,
        "adapter_sha256": None,
        "tokens": body["details"]["tokens"],
        "prefill": [],
        "top_tokens": None,
        "best_of_sequences": None,
    }
    assert "".join(t["text"] for t in body["details"]["tokens"]) == "hellohe"
    req = engine.requests[-1]
    assert req.params.max_new_tokens == 7 and req.params.do_sample is False
    assert req.adapter_id is None and req.prompt_ids == list(b"hello")


def test_generate_with_adapter_changes_text(app):
    client, engine = app
    upload(client, "abc")
    r = client.post(
        "/generate",
        json={"inputs": "hello", "parameters": {"adapter_id": "abc", "max_new_tokens": 5}},
    )
    assert r.status_code == 200, r.text
    assert r.json()["generated_text"] == expected_text("hello", "abc", 5) == "khoor"
    assert r.json()["details"]["adapter_id"] == "abc"
    assert engine.requests[-1].adapter_id == "abc"


def test_generate_details_tokens_and_stop(app):
    client, _ = app
    r = client.post(
        "/generate",
        json={
            "inputs": "abcd",
            "parameters": {"max_new_tokens": 8, "details": True, "stop": ["cd"]},
        },
    )
    body = r.json()
    assert body["generated_text"] == "abc"
    assert body["details"]["finish_reason"] == "stop_sequence"
    assert [t["text"] for t in body["details"]["tokens"]] == ["a", "b", "c"]
    assert [t["logprob"] for t in body["details"]["tokens"]] == [-0.1, -0.2, -0.3]
    assert [t["id"] for t in body["details"]["tokens"]] == [97, 98, 99]


def test_sampling_params_pass_through_and_seed_reported(app):
    client, engine = app
    r = client.post(
        "/generate",
        json={
            "inputs": "x",
            "parameters": {
                "max_new_tokens": 2,
                "temperature": 0.5,
                "top_k": 3,
                "top_p": 0.9,
                "repetition_penalty": 1.2,
            },
        },
    )
    p = engine.requests[-1].params
    # A warper turns sampling on (as TGI does), and a seed is chosen and reported.
    assert p.do_sample is True and p.temperature == 0.5 and p.top_k == 3 and p.top_p == 0.9
    assert p.repetition_penalty == 1.2
    assert isinstance(p.seed, int) and r.json()["details"]["seed"] == p.seed
    r = client.post(
        "/generate", json={"inputs": "x", "parameters": {"do_sample": True, "seed": 42}}
    )
    assert engine.requests[-1].params.seed == 42 and r.json()["details"]["seed"] == 42


def test_generate_stream_format_and_equals_non_streaming(app):
    client, _ = app
    params = {"max_new_tokens": 6}
    full = client.post("/generate", json={"inputs": "stream", "parameters": params}).json()
    r = client.post("/generate_stream", json={"inputs": "stream", "parameters": params})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert len(events) == 6  # one per token; the last carries the text and details
    for i, e in enumerate(events[:-1]):
        assert set(e) == {"index", "token", "top_tokens", "generated_text", "details"}
        assert e["index"] == i and e["top_tokens"] is None
        assert e["generated_text"] is None and e["details"] is None
        token_fields = {"id", "text", "logprob", "special", "skipped", "alternative_tokens"}
        assert set(e["token"]) == token_fields
        assert isinstance(e["token"]["logprob"], float)
    last = events[-1]
    assert last["generated_text"] == full["generated_text"] == "stream"
    assert "".join(e["token"]["text"] for e in events) == "stream"
    assert last["details"]["finish_reason"] == "length"
    assert last["details"]["generated_tokens"] == 6 and last["details"]["prompt_tokens"] == 6


def test_unknown_adapter_is_404_both_routes(app):
    client, _ = app
    body = {"inputs": "hi", "parameters": {"adapter_id": "nope"}}
    for route in ("/generate", "/generate_stream"):
        r = client.post(route, json=body)
        assert r.status_code == 404
        assert r.json()["error_type"] == "not_found_error"  # TGI's flat shape
        assert "nope" in r.json()["error"]


def test_queue_full_is_429_with_retry_after(app):
    client, engine = app
    engine.queue_full = True
    for route in ("/generate", "/generate_stream"):
        r = client.post(route, json={"inputs": "hi"})
        assert r.status_code == 429
        assert r.headers["retry-after"] == "3"  # ceil(2.5)
        assert r.json()["error_type"] == "overloaded"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"max_new_tokens": 5000}, "parameters.max_new_tokens"),  # over the settings cap
        ({"max_new_tokens": 62}, "parameters.max_new_tokens"),  # 3 + 62 > context 64
        ({"max_new_tokens": 0}, "parameters.max_new_tokens"),
        ({"stop": ["a"] * 9}, "parameters.stop"),
        ({"stop": ["x" * 65]}, "parameters.stop"),
        ({"temperature": -1}, "parameters.temperature"),
        ({"top_p": 1.5}, "parameters.top_p"),
        ({"best_of": 2}, "parameters.best_of"),
        ({"typical_p": 0.5}, "parameters.typical_p"),
        ({"max_token": 5}, "parameters.max_token"),  # a typo is never ignored
    ],
)
def test_caps_are_422_naming_the_field(app, params, field):
    client, engine = app
    n = len(engine.requests)
    r = client.post("/generate", json={"inputs": "abc", "parameters": params})
    assert r.status_code == 422, r.text
    assert r.json()["error"].startswith(field) and r.json()["error_type"] == "validation"
    assert len(engine.requests) == n  # nothing reached the engine


def test_prompt_longer_than_context_is_422(app):
    client, _ = app
    r = client.post("/generate", json={"inputs": "x" * 64})
    assert r.status_code == 422 and r.json()["param"] == "inputs"


def test_default_max_new_tokens_shrinks_to_fit(app):
    client, engine = app
    client.post("/generate", json={"inputs": "x" * 60})
    assert engine.requests[-1].params.max_new_tokens == 4  # context 64 - 60 prompt tokens


def test_malformed_json_is_422_not_500(app):
    client, _ = app
    r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["error_type"] == "validation" and r.json()["error"]
    r = client.post("/generate", json={"parameters": {}})
    assert r.status_code == 422 and r.json()["param"] == "inputs"


def test_engine_invalid_request_is_422(app):
    from flora_server.engine.protocol import InvalidRequestError

    client, engine = app

    def refuse(request):
        raise InvalidRequestError("prompt token ids must be in [0, 49152)")

    engine.generate = refuse
    r = client.post("/v1/completions", json={"model": "fake-base", "prompt": [99999999]})
    assert r.status_code == 422 and "token ids" in r.json()["error"]["message"]


def test_client_disconnect_cancels_non_streaming_request(tmp_path):
    import asyncio

    from api_fakes import FakeEngine

    from flora_server.adapters.registry import AdapterRegistry
    from flora_server.adapters.store import LocalAdapterStore
    from flora_server.api import engine_requests
    from flora_server.engine.protocol import GenerationRequest, SamplingParams
    from flora_server.errors import APIError
    from flora_server.metrics import ServerMetrics

    engine = FakeEngine(AdapterRegistry(LocalAdapterStore(tmp_path / "s"), tmp_path / "u"))
    engine.token_delay = 0.01
    closed = []
    original = engine._run

    async def tracked(request):
        try:
            async for event in original(request):
                yield event
        finally:
            closed.append(len(engine.requests))

    engine._run = tracked

    async def receive_disconnect_after_50ms():
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    async def main():
        request = GenerationRequest("r", list(b"abc"), SamplingParams(max_new_tokens=1000))
        started = asyncio.get_running_loop().time()
        with pytest.raises(APIError) as info:
            await engine_requests.collect(
                engine, request, ServerMetrics(), receive_disconnect_after_50ms
            )
        return info.value.status, asyncio.get_running_loop().time() - started

    status, elapsed = asyncio.run(main())
    assert status == 499 and closed == [1]  # the engine's iterator was closed
    assert elapsed < 2  # 1000 tokens at 10 ms would take 10 s


def test_token_texts_are_their_own_and_eos_has_none(app, monkeypatch):
    """TGI's `token.text` is the token's own text, not the text released with it: the
    newlines held back for a possible stop sequence and released with EOS belong to the
    newline tokens, EOS has none, and the non-special tokens' texts concatenate to
    `generated_text`, in `details.tokens` and in the stream."""
    client, engine = app
    monkeypatch.setattr(engine, "generate", scripted(held_back_then_eos()))
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 4, "stop": ["\n\nX"]}}
    full = client.post("/generate", json=body)
    assert full.status_code == 200, full.text
    tokens = full.json()["details"]["tokens"]
    assert [(t["id"], t["text"], t["special"]) for t in tokens] == [
        (97, "ab", False),
        (10, "\n", False),
        (10, "\n", False),
        (0, "", True),
    ]
    events = sse_events(client.post("/generate_stream", json=body).text)
    assert [e["token"] for e in events] == tokens
    text = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
    assert text == events[-1]["generated_text"] == full.json()["generated_text"] == "ab\n\n"
