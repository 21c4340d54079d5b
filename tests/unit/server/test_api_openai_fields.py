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


@pytest.mark.parametrize(
    ("route", "body", "field", "value"),
    [
        ("/v1/completions", COMPLETION, "guided_grammar", "root ::= 'a'"),
        ("/v1/completions", COMPLETION, "prompt_logprobs", 1),
        ("/v1/completions", COMPLETION, "length_penalty", 0.5),
        ("/v1/completions", COMPLETION, "use_beam_search", 1),  # not `false`
        ("/v1/chat/completions", CHAT, "guided_decoding_backend", "outlines"),
        ("/v1/chat/completions", CHAT, "echo", True),
        ("/v1/chat/completions", CHAT, "chat_template", "{{ messages }}"),
        ("/v1/chat/completions", CHAT, "add_generation_prompt", False),
    ],
)
def test_a_vllm_option_this_server_cannot_honour_is_refused(client, route, body, field, value):
    """vLLM's extras change what is generated: set, they are 422 naming them, never
    answered as if they were absent."""
    r = client.post(route, json={**body, field: value})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == field and "vLLM option" in error["message"]


@pytest.mark.parametrize(
    ("route", "body", "unset"),
    [
        (
            "/v1/completions",
            COMPLETION,
            {"min_tokens": 0, "ignore_eos": False, "min_p": 0.0,
             "skip_special_tokens": True, "guided_json": None, "length_penalty": 1,
             "guided_choice": None},
        ),
        (
            "/v1/chat/completions",
            CHAT,
            {"echo": False, "add_generation_prompt": True, "chat_template_kwargs": {},
             "continue_final_message": False, "bad_words": []},
        ),
    ],
)  # fmt: skip
def test_vllm_options_at_their_unset_values_change_nothing(client, route, body, unset):
    want = client.post(route, json=body).json()
    r = client.post(route, json={**body, **unset})
    assert r.status_code == 200, r.text
    strip = ("id", "created")
    assert {k: v for k, v in r.json().items() if k not in strip} == {
        k: v for k, v in want.items() if k not in strip
    }


def test_ignore_eos_and_stop_token_ids_reach_the_engine(tmp_path) -> None:
    extras = {"ignore_eos": True, "stop_token_ids": [13, 7]}
    with running_app(tmp_path) as (client, engine):
        for route, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
            assert client.post(route, json={**body, **extras}).status_code == 200
            params = engine.requests[-1].params
            assert params.ignore_eos is True and params.stop_token_ids == (13, 7)
            assert client.post(route, json=body).status_code == 200
            params = engine.requests[-1].params
            assert params.ignore_eos is False and params.stop_token_ids == ()
            for bad in ([-1], ["a"], list(range(65))):
                r = client.post(route, json={**body, "stop_token_ids": bad})
                assert r.status_code == 422 and r.json()["error"]["param"].startswith(
                    "stop_token_ids"
                ), r.text


def test_allowed_token_ids_reach_the_engine(tmp_path) -> None:
    with running_app(tmp_path) as (client, engine):
        for route, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
            for given, want in (([3, 9], (3, 9)), ([], ()), (None, ())):
                r = client.post(route, json={**body, "allowed_token_ids": given})
                assert r.status_code == 200, r.text
                assert engine.requests[-1].params.allowed_token_ids == want
            r = client.post(route, json={**body, "allowed_token_ids": [-1]})
            assert r.status_code == 422, r.text
            assert r.json()["error"]["param"].startswith("allowed_token_ids"), r.text


def test_min_p_reaches_the_engine(tmp_path) -> None:
    with running_app(tmp_path) as (client, engine):
        for route, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
            for given, want in ((0.25, 0.25), (0, 0.0), (None, 0.0)):
                r = client.post(route, json={**body, "min_p": given})
                assert r.status_code == 200, r.text
                assert engine.requests[-1].params.min_p == want
            for bad in (-0.1, 1.5, "x"):
                r = client.post(route, json={**body, "min_p": bad})
                assert r.status_code == 422 and r.json()["error"]["param"] == "min_p", r.text


def test_min_tokens_reaches_the_engine_and_cannot_exceed_max_tokens(tmp_path) -> None:
    with running_app(tmp_path) as (client, engine):
        for route, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
            for given, want in ((3, 3), (0, 0), (None, 0)):
                r = client.post(route, json={**body, "min_tokens": given})
                assert r.status_code == 200, r.text
                assert engine.requests[-1].params.min_tokens == want
            for bad, says in ((4, "more than the 3 tokens"), (-1, "greater than or equal")):
                r = client.post(route, json={**body, "min_tokens": bad})
                assert r.status_code == 422, r.text
                error = r.json()["error"]
                assert error["param"] == "min_tokens" and says in error["message"], error
        # without max_tokens, more than the context can hold is 422 too
        r = client.post("/v1/completions", json={"model": "fake-base", "prompt": "hi",
                                                  "min_tokens": 10**6})  # fmt: skip
        assert r.status_code == 422 and r.json()["error"]["param"] == "min_tokens", r.text


def test_min_tokens_above_the_default_length_raises_it(tmp_path) -> None:
    """Without max_tokens a request gets the server's default length; a min_tokens above it
    raises it (vLLM's default is the rest of the context), not a 422."""
    with running_app(tmp_path, default_max_new_tokens=8) as (client, engine):
        body = {"model": "fake-base", "prompt": "hi", "min_tokens": 20}
        assert client.post("/v1/completions", json=body).status_code == 200
        assert engine.requests[-1].params.max_new_tokens == 20
        del body["min_tokens"]
        assert client.post("/v1/completions", json=body).status_code == 200
        assert engine.requests[-1].params.max_new_tokens == 8


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        ({"guided_json": "{not json"}, "guided_json", "is not JSON"),
        ({"guided_json": "[1, 2]"}, "guided_json", "JSON schema object"),
        ({"guided_choice": []}, "guided_choice", "at least 1"),
        ({"guided_choice": ["yes", ""]}, "guided_choice", "non-empty"),
        ({"guided_regex": ""}, "guided_regex", "at least 1"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "not several"),
        ({"response_format": {"type": "json_object"}, "guided_json": {}}, "guided_json",
         "not several"),
        # well-formed: the fake engine has no grammar support, and says so naming the field
        ({"guided_choice": ["yes", "no"]}, "guided_choice", "not supported by this engine"),
        ({"guided_json": '{"type": "object"}'}, "guided_json", "not supported by this engine"),
    ],
)  # fmt: skip
def test_guided_decoding_extras_are_read_and_their_errors_named(client, extra, param, says):
    r = client.post("/v1/chat/completions", json={**CHAT, **extra})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_a_choice_is_matched_literally() -> None:
    """guided_choice's strings are literal text: regex syntax in them is escaped."""
    import re

    from flora_server.api.structured import from_openai_request
    from flora_server.schemas.openai import ChatCompletionRequest

    choices = ["a.b", "(x|y)*", "1+1=2?", "back\\slash", "[z]{2}^$"]
    body = ChatCompletionRequest.model_validate({**CHAT, "guided_choice": choices})
    spec, param = from_openai_request(body)
    assert param == "guided_choice" and spec is not None and spec.kind == "regex"
    assert spec.pattern is not None
    for choice in choices:
        assert re.fullmatch(spec.pattern, choice), choice
    for other in ("aXb", "xy", "11=2", "[z]", "zz"):
        assert not re.fullmatch(spec.pattern, other), other
