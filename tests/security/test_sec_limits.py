"""Property 8 (body cap) and 9 (deadline semantics) through the real app on the fake engine."""

from __future__ import annotations

import json

from api_fakes import running_app

from flora_server.engine.protocol import FinishEvent


def test_request_body_cap_declared_and_streamed(tmp_path):
    with running_app(tmp_path, max_request_bytes=2048) as (client, engine):
        big = {"inputs": "x" * 4096, "parameters": {"max_new_tokens": 1}}
        r = client.post("/generate", json=big)
        # /generate answers TGI's flat error shape.
        assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"
        assert "2048" in r.json()["error"]

        def chunks():  # no Content-Length: counted while it streams
            data = json.dumps(big).encode()
            for i in range(0, len(data), 512):
                yield data[i : i + 512]

        r = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert engine.requests == []  # nothing reached the engine
        ok = client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 1}})
        assert ok.status_code == 200


def test_deadline_before_first_token_is_504(tmp_path):
    with running_app(tmp_path) as (client, engine):

        async def expired(request):
            yield FinishEvent("deadline", "", len(request.prompt_ids), 0)

        engine._run = expired
        body = {"inputs": "hi", "parameters": {"max_new_tokens": 4}}
        for route in ("/generate", "/generate_stream"):
            r = client.post(route, json=body)
            assert r.status_code == 504, (route, r.text)
            assert r.json()["error_type"] == "timeout_error"  # TGI's flat shape
