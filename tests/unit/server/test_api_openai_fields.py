"""Request fields of the OpenAI routes that OpenAI's spec and vLLM define with rules of
their own: explicit nulls, `stream_options` without a stream, `tool_choice` without tools.
Against the fake engine."""

from __future__ import annotations

import pytest
from api_fakes import running_app

CHAT = {"model": "fake-base", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
COMPLETION = {"model": "fake-base", "prompt": "hello", "max_tokens": 3}


@pytest.fixture
def client(tmp_path):
    with running_app(tmp_path) as (client, _):
        yield client


@pytest.mark.parametrize(
    ("route", "body", "nulls"),
    [
        ("/v1/completions", COMPLETION, ["n", "stream", "echo", "logprobs"]),
        ("/v1/chat/completions", CHAT, ["n", "stream", "logprobs", "top_logprobs"]),
    ],
)
def test_an_explicit_null_is_the_default(client, route, body, nulls) -> None:
    """The spec makes these nullable: null answers exactly as the field left out."""
    want = client.post(route, json=body)
    got = client.post(route, json={**body, **dict.fromkeys(nulls)})
    assert want.status_code == got.status_code == 200, got.text
    strip = ("id", "created")
    assert {k: v for k, v in got.json().items() if k not in strip} == {
        k: v for k, v in want.json().items() if k not in strip
    }


@pytest.mark.parametrize(
    "route,body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)]
)
def test_stream_options_need_a_stream(client, route, body) -> None:
    options = {"stream_options": {"include_usage": True}}
    for stream in ({}, {"stream": False}, {"stream": None}):
        r = client.post(route, json={**body, **options, **stream})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["param"] == "stream_options" and "stream is true" in error["message"]
    r = client.post(route, json={**body, **options, "stream": True})
    assert r.status_code == 200 and '"usage"' in r.text


@pytest.mark.parametrize(
    "choice", ["required", "auto", {"type": "function", "function": {"name": "get_weather"}}]
)
@pytest.mark.parametrize("tools", [{}, {"tools": None}, {"tools": []}])
def test_a_tool_choice_without_tools_is_refused(client, choice, tools) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, **tools, "tool_choice": choice})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == "tool_choice" and "tools" in error["message"]


@pytest.mark.parametrize("choice", [{"tool_choice": "none"}, {"tool_choice": None}])
def test_no_tools_and_no_tool_call_asked_is_plain_text(client, choice) -> None:
    want = client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]
    r = client.post("/v1/chat/completions", json={**CHAT, **choice})
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]
    assert got == want and got["finish_reason"] == "length"
    assert got["message"]["content"] and not got["message"].get("tool_calls")
