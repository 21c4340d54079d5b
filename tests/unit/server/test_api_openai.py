"""OpenAI-shaped routes against the fake engine, through raw HTTP and the official client."""

from __future__ import annotations

import io

import openai
import pytest
from api_fakes import (
    expected_text,
    held_back_then_eos,
    make_archive,
    running_app,
    scripted,
    sse_events,
)

from flora_server.engine.protocol import FinishEvent, TokenEvent


@pytest.fixture
def app(tmp_path):
    with running_app(tmp_path) as pair:
        client, _ = pair
        r = client.post(
            "/v1/adapters",
            data={"adapter_id": "ad1"},
            files={"archive": ("a.flora", io.BytesIO(make_archive()))},
        )
        assert r.status_code == 201
        yield pair


@pytest.fixture
def oai(app):
    client, _ = app
    return openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client)


def test_completion_base_and_adapter(app, oai):
    _, engine = app
    out = oai.completions.create(model="fake-base", prompt="hello", max_tokens=4, temperature=0)
    assert out.choices[0].text == "hell"
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (5, 4)
    assert engine.requests[-1].adapter_id is None
    assert engine.requests[-1].params.do_sample is False
    out = oai.completions.create(model="ad1", prompt="hello", max_tokens=4, temperature=0)
    assert out.choices[0].text == expected_text("hello", "ad1", 4) == "khoo"
    assert engine.requests[-1].adapter_id == "ad1"


def test_completion_default_temperature_samples(app, oai):
    _, engine = app
    oai.completions.create(model="fake-base", prompt="hi", max_tokens=1, seed=7)
    p = engine.requests[-1].params
    assert p.do_sample is True and p.temperature == 1.0 and p.seed == 7


def test_completion_stream_chunks_and_done(app, oai):
    client, _ = app
    r = client.post(
        "/v1/completions",
        json={
            "model": "ad1",
            "prompt": "hello",
            "max_tokens": 5,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    chunks = events[:-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "khoor"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" for c in chunks)
    # The official client reassembles the same text.
    stream = oai.completions.create(
        model="ad1", prompt="hello", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == "khoor"


def test_chat_completion_and_stream(app, oai):
    _, engine = app
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    out = oai.chat.completions.create(model="ad1", messages=messages, max_tokens=6, temperature=0)
    prompt = "<system>S<user>hi<assistant>"
    assert engine.requests[-1].prompt_ids == list(prompt.encode())
    assert out.choices[0].message.content == expected_text(prompt, "ad1", 6)
    assert out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens == 6
    stream = oai.chat.completions.create(
        model="ad1", messages=messages, max_tokens=6, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_logprobs(app, oai):
    out = oai.chat.completions.create(
        model="fake-base",
        messages=[{"role": "user", "content": "ab"}],
        max_tokens=2,
        temperature=0,
        logprobs=True,
    )
    assert [t.logprob for t in out.choices[0].logprobs.content] == [-0.1, -0.2]


def test_models_lists_base_and_adapters_with_parent_and_status(app, oai):
    client, _ = app
    models = {m.id: m for m in oai.models.list()}
    assert set(models) == {"fake-base", "ad1"}
    ad = models["ad1"].model_dump()
    assert ad["parent"] == "fake-base" and ad["status"] == "stored" and ad["loaded"] is False
    oai.completions.create(model="ad1", prompt="x", max_tokens=1, temperature=0)  # loads it
    ad = client.get("/v1/models").json()["data"][1]
    assert ad["id"] == "ad1" and ad["status"] == "loaded" and ad["loaded"] is True


def test_unknown_model_is_404_via_client(app, oai):
    with pytest.raises(openai.NotFoundError) as info:
        oai.completions.create(model="missing", prompt="x", max_tokens=1)
    # OpenAI's own shape: type invalid_request_error, code model_not_found.
    assert info.value.body["code"] == "model_not_found"
    assert info.value.body["message"] == (
        "The model `missing` does not exist or you do not have access to it."
    )


@pytest.mark.parametrize(
    ("route", "extra", "field"),
    [
        ("/v1/completions", {"n": 2}, "n"),
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
        ("/v1/completions", {"echo": True, "stream": True}, "echo"),
        ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"max_tokens": 100000}, "max_tokens"),
        ("/v1/completions", {"stop": ["a"] * 9}, "stop"),
        ("/v1/chat/completions", {"n": 3}, "n"),
        ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
        ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools"),
        ("/v1/chat/completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ],
)
def test_openai_caps_are_422_naming_the_field(app, route, extra, field):
    client, _ = app
    body = {"model": "fake-base", **extra}
    body |= (
        {"prompt": "abc"}
        if route.endswith("/completions") and "chat" not in route
        else {"messages": [{"role": "user", "content": "abc"}]}
    )
    r = client.post(route, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"].startswith(field)


def test_openai_client_raises_typed_422(app, oai):
    with pytest.raises(openai.UnprocessableEntityError):
        oai.completions.create(model="fake-base", prompt="x", n=2)


def test_completion_top_logprobs_stay_aligned_with_tokens(app, monkeypatch):
    """A token without a logprob keeps its place in `top_logprobs` as null (OpenAI's lists
    are per token), in the response and in the stream."""
    client, engine = app
    pieces = [("a", -0.5), ("b", None), ("c", -1.5)]

    async def run(request):  # type: ignore[no-untyped-def]
        for i, (text, logprob) in enumerate(pieces):
            yield TokenEvent(100 + i, text, text, logprob)
        yield FinishEvent("length", "abc", len(request.prompt_ids), len(pieces))

    monkeypatch.setattr(engine, "generate", run)
    body = {"model": "fake-base", "prompt": "hi", "max_tokens": 3, "temperature": 0, "logprobs": 1}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["a", "b", "c"]
    assert lp["token_logprobs"] == [-0.5, None, -1.5]
    assert lp["top_logprobs"] == [{"a": -0.5}, None, {"c": -1.5}]
    assert lp["text_offset"] == [0, 1, 2]
    s = client.post("/v1/completions", json={**body, "stream": True})
    chunks = [e for e in sse_events(s.text) if e != "[DONE]" and e["choices"][0]["text"]]
    got = [c["choices"][0]["logprobs"] for c in chunks]
    assert [g["top_logprobs"] for g in got] == [[{"a": -0.5}], [None], [{"c": -1.5}]]
    assert all(len(g["top_logprobs"]) == len(g["tokens"]) == 1 for g in got)


HELD_BACK_TOKENS = ["ab", "\n", "\n", ""]  # api_fakes.held_back_then_eos: EOS has no text


def test_completion_logprobs_are_the_tokens_own_streamed_or_not(app, monkeypatch):
    """Text held back for a possible stop sequence (released with EOS) is not any token's
    text: `tokens` are the tokens' own texts, `top_logprobs` holds the `logprobs`
    alternatives keyed by those texts (the token among them, once) and `text_offset` says
    where each token starts. A stream reports the same, token by token."""
    client, engine = app
    monkeypatch.setattr(engine, "generate", scripted(held_back_then_eos()))
    body = {
        "model": "fake-base",
        "prompt": "hi",
        "max_tokens": 4,
        "temperature": 0,
        "logprobs": 2,
        "stop": ["\n\nX"],
    }
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == "ab\n\n"
    lp = choice["logprobs"]
    assert lp["tokens"] == HELD_BACK_TOKENS
    assert lp["token_logprobs"] == [-0.1, -0.2, -0.3, -0.4]
    assert lp["top_logprobs"] == [
        {"ab": -0.1, "b": -1},
        {"\n": -0.2, "b": -2},
        {"\n": -0.3, "b": -3},
        {"": -0.4, "b": -4},
    ]
    assert lp["text_offset"] == [0, 2, 3, 4]
    s = client.post("/v1/completions", json={**body, "stream": True})
    chunks = [e["choices"][0] for e in sse_events(s.text) if e != "[DONE]"]
    assert "".join(c["text"] for c in chunks) == choice["text"]
    streamed = [c["logprobs"] for c in chunks if c["logprobs"] is not None]
    assert {key: [x for g in streamed for x in g[key]] for key in lp} == lp


def test_chat_logprobs_stream_equals_non_stream_eos_included(app, monkeypatch):
    """Both report every generated token, the EOS token too (as vLLM does; it counts in
    `completion_tokens`), each with its own text and bytes, also where the content that
    goes with it was held back or released later."""
    client, engine = app
    monkeypatch.setattr(engine, "generate", scripted(held_back_then_eos()))
    body = {
        "model": "fake-base",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == HELD_BACK_TOKENS
    assert [c["bytes"] for c in content] == [[97, 98], [10], [10], []]
    assert [c["top_logprobs"][0]["token"] for c in content] == HELD_BACK_TOKENS
    assert len(content) == r.json()["usage"]["completion_tokens"]
    s = client.post("/v1/chat/completions", json={**body, "stream": True})
    chunks = [e["choices"][0] for e in sse_events(s.text) if e != "[DONE]"]
    assert "".join(c["delta"].get("content", "") for c in chunks) == choice["message"]["content"]
    streamed = [x for c in chunks if c["logprobs"] for x in c["logprobs"]["content"]]
    assert streamed == content
