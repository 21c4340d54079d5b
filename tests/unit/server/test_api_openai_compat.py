"""OpenAI conventions against the fake engine, through the official `openai` client:
error codes, `GET /v1/models/{id}`, `base:adapter`, `echo` with logprobs, and
`--served-model-name`."""

from __future__ import annotations

import io

import openai
import pytest
from api_fakes import expected_text, make_archive, running_app


def _upload(client) -> None:
    r = client.post(
        "/v1/adapters",
        data={"adapter_id": "ad1"},
        files={"archive": ("a.flora", io.BytesIO(make_archive()))},
    )
    assert r.status_code == 201


@pytest.fixture
def app(tmp_path):
    with running_app(tmp_path) as pair:
        _upload(pair[0])
        yield pair


@pytest.fixture
def oai(app):
    client, _ = app
    return openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client)


def test_over_long_prompt_is_400_context_length_exceeded(oai):
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="fake-base", prompt="x" * 60, max_tokens=10)
    body = info.value.body
    assert body["code"] == "context_length_exceeded" and body["type"] == "invalid_request_error"
    assert body["message"].startswith(
        "This model's maximum context length is 64 tokens. However, you requested 70 tokens "
        "(60 in the messages, 10 in the completion)."
    )
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(
            model="fake-base", messages=[{"role": "user", "content": "y" * 80}]
        )
    assert info.value.body["code"] == "context_length_exceeded"


def test_base_colon_adapter_names_the_adapter(app, oai):
    _, engine = app
    out = oai.completions.create(model="fake-base:ad1", prompt="hello", max_tokens=3)
    assert engine.requests[-1].adapter_id == "ad1"
    assert out.choices[0].text == expected_text("hello", "ad1", 3)
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="fake-base:nope", prompt="x", max_tokens=1)


def test_retrieve_one_model(oai):
    assert oai.models.retrieve("fake-base").id == "fake-base"
    card = oai.models.retrieve("ad1")
    assert card.id == "ad1" and card.model_dump()["parent"] == "fake-base"
    with pytest.raises(openai.NotFoundError) as info:
        oai.models.retrieve("missing")
    assert info.value.body["code"] == "model_not_found"


def test_echo_with_logprobs_scores_the_prompt(app, oai):
    _, engine = app
    out = oai.completions.create(
        model="fake-base", prompt="abcd", max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    choice = out.choices[0]
    assert choice.text == "abcd"
    assert choice.logprobs.tokens == ["a", "b", "c", "d"]
    assert choice.logprobs.token_logprobs == [None, -0.01, -0.02, -0.03]
    assert choice.logprobs.top_logprobs == [None, {"b": -0.01}, {"c": -0.02}, {"d": -0.03}]
    assert choice.logprobs.text_offset == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 0
    assert engine.requests[-1].params.prompt_logprobs
    # lm-eval's shape: token ids in a list of one, one token generated after the prompt.
    out = oai.completions.create(
        model="fake-base", prompt=[[104, 105]], max_tokens=1, echo=True, logprobs=2
    )
    choice = out.choices[0]
    assert choice.text == "hih"
    assert choice.logprobs.token_logprobs == [None, -0.01, -0.1]
    assert choice.logprobs.text_offset == [0, 1, 2]  # the generated token after the prompt
    assert choice.logprobs.top_logprobs[-1] == {"h": -0.1, "i": pytest.approx(-1.1)}


def test_served_model_name_renames_the_base(tmp_path):
    with running_app(tmp_path, served_model_name="my-model") as (client, engine):
        assert engine.model_name == "my-model"
        assert client.get("/v1/models").json()["data"][0]["id"] == "my-model"
        assert client.get("/info").json()["model_id"] == "my-model"
        r = client.post("/v1/completions", json={"model": "my-model", "prompt": "ab"})
        assert r.status_code == 200 and engine.requests[-1].adapter_id is None
