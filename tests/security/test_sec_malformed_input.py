"""Property 18: text that is not valid Unicode and bodies that are not valid JSON are a 422
naming the field (or `body`), never a 500 or a 400; the OpenAPI document lists the error
answers of the upload route and of the probes.

A lone UTF-16 surrogate (`"\\ud800"`) is legal JSON and Python keeps it in a `str`, but the
tokenizer raised a TypeError on it (a 500 on the OpenAI routes)."""

from __future__ import annotations

import json

import pytest
from api_fakes import expected_text, running_app
from tiny import api_error

pytestmark = pytest.mark.timeout(120)

JSON = {"content-type": "application/json"}
LONE = "a\ud800b"  # json.dumps writes it as the escape "a\\ud800b"


def _chat(content: object, **fields: object) -> dict:
    return {"model": "fake-base", "messages": [{"role": "user", "content": content}], **fields}


def _cmpl(**fields: object) -> dict:
    return {"model": "fake-base", "prompt": "hi", **fields}


# (route, body, the field the 422 must name)
SURROGATES = [
    # The report's attack first: these were 500s (the TGI routes already answered 422).
    ("/v1/completions", _cmpl(prompt=LONE), "prompt"),
    ("/v1/completions", _cmpl(prompt=LONE, stream=True), "prompt"),
    ("/v1/completions", _cmpl(prompt=[LONE]), "prompt.0"),
    ("/v1/completions", _cmpl(stop=LONE), "stop"),
    ("/v1/completions", _cmpl(stop=["x", "\udfff"]), "stop.1"),
    ("/v1/completions", _cmpl(model=LONE), "model"),
    ("/v1/chat/completions", _chat(LONE), "messages.0.content"),
    ("/v1/chat/completions", _chat(LONE, stream=True), "messages.0.content"),
    ("/v1/chat/completions", _chat([{"type": "text", "text": LONE}]), "messages.0.content.0.text"),
    (
        "/v1/chat/completions",
        _chat([{"type": "text", "text": "ok"}, {"type": "text", "text": LONE}], stream=True),
        "messages.0.content.1.text",
    ),
    ("/generate", {"inputs": LONE}, "inputs"),
    ("/generate_stream", {"inputs": LONE}, "inputs"),
    ("/generate", {"inputs": "hi", "parameters": {"stop": ["ok", LONE]}}, "parameters.stop.1"),
    ("/generate", {"inputs": "hi", "parameters": {"adapter_id": LONE}}, "parameters.adapter_id"),
]


def test_lone_surrogates_are_422_naming_the_field(tmp_path):
    with running_app(tmp_path) as (client, engine):
        for path, body, param in SURROGATES:
            r = client.post(path, content=json.dumps(body), headers=JSON)
            assert r.status_code == 422, (path, body, r.text)
            error = api_error(r)
            assert error["param"] == param, (path, error)
            surrogate, index = ("DFFF", 0) if param == "stop.1" else ("D800", 1)
            assert error["message"] == (
                f"{param}: contains a lone surrogate (U+{surrogate}) at index {index}: "
                "text must be valid Unicode"
            ), error
        assert engine.requests == []
        # A surrogate pair is one valid character (U+1F600): served as such.
        text = "hi \U0001f600"
        r = client.post(
            "/generate",
            content=json.dumps({"inputs": text, "parameters": {"max_new_tokens": 5}}),
            headers=JSON,
        )
        assert r.status_code == 200, r.text
        assert r.json()["generated_text"] == expected_text(text, None, 5)
        assert client.get("/health").status_code == 200


MALFORMED = [
    (b'{"inputs": "\xff\xfe"}', "body: invalid JSON: not valid UTF-8"),
    (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", "body: invalid JSON: nested too deeply"),
    (b'{"inputs": "hi"', "body: invalid JSON at position 15: Expecting ',' delimiter"),
    (
        b'{"inputs": "hi",}',
        "body: invalid JSON at position 16: Expecting property name enclosed in double quotes",
    ),
]


@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions"])
def test_malformed_bodies_are_422_on_body(tmp_path, path):
    with running_app(tmp_path) as (client, engine):
        for raw, message in MALFORMED:
            r = client.post(path, content=raw, headers=JSON)
            assert r.status_code == 422, (raw[:40], r.text)
            assert api_error(r) == {
                "type": "validation" if path == "/generate" else "invalid_request_error",
                "message": message,
                "param": "body",
            }, raw[:40]
        assert engine.requests == []
        ok = client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 3}})
        assert ok.status_code == 200 and ok.json()["generated_text"] == expected_text("hi", None, 3)


def test_openapi_lists_upload_and_probe_errors(tmp_path):
    with running_app(tmp_path) as (client, _):
        paths = client.get("/openapi.json").json()["paths"]
        upload = paths["/v1/adapters"]["post"]["responses"]
        for status in ("400", "409", "413", "415", "422", "401", "403"):
            assert status in upload, (status, sorted(upload))
        for status in ("400", "409", "413", "415"):
            schema = upload[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (status, schema)
        for probe in ("/health", "/ready"):
            responses = paths[probe]["get"]["responses"]
            assert set(responses) == {"200", "503"}, (probe, responses)
            schema = responses["503"]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
