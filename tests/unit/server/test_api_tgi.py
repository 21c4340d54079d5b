"""TGI/LoRAX compatibility against the fake engine: `POST /`, `GET /info`, the flat error
shape, TGI's response types (parsed with the real client packages' own models) and the
parameters TGI honours."""

from __future__ import annotations

import io

import pytest
from api_fakes import expected_text, make_archive, running_app, sse_events


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


def test_root_post_is_generate_as_a_one_element_list(app):
    client, engine = app
    body = {"inputs": "hello", "parameters": {"adapter_id": "ad1", "max_new_tokens": 4}}
    r = client.post("/", json=body)
    assert r.status_code == 200, r.text
    (answer,) = r.json()
    assert answer["generated_text"] == expected_text("hello", "ad1", 4)
    assert answer == client.post("/generate", json=body).json()
    assert engine.requests[-1].adapter_id == "ad1"


def test_root_post_with_stream_is_sse(app):
    client, _ = app
    body = {"inputs": "abc", "parameters": {"max_new_tokens": 3}, "stream": True}
    r = client.post("/", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert [e["index"] for e in events] == [0, 1, 2]
    assert [e["token"]["text"] for e in events] == ["a", "b", "c"]
    assert [e["token"]["logprob"] for e in events] == [-0.1, -0.2, -0.3]
    final = events[-1]["details"]
    assert events[-1]["generated_text"] == "abc"
    assert final["finish_reason"] == "length" and final["input_length"] == 3


def test_responses_parse_with_the_client_packages_types(app):
    lorax_types = pytest.importorskip("lorax.types")
    tg_types = pytest.importorskip("text_generation.types")
    client, _ = app
    params = {"max_new_tokens": 3, "details": True, "decoder_input_details": True}
    r = client.post("/", json={"inputs": "xyz", "parameters": {**params, "top_n_tokens": 2}})
    tg = tg_types.Response(**r.json()[0])
    assert [t.text for t in tg.details.tokens] == ["x", "y", "z"]
    assert [t.logprob for t in tg.details.prefill] == [None, -0.01, -0.02]
    assert [[t.id for t in top] for top in tg.details.top_tokens] == [
        [120, 121],
        [121, 122],
        [122, 123],
    ]
    r = client.post(
        "/", json={"inputs": "xyz", "parameters": {**params, "return_k_alternatives": 2}}
    )
    lx = lorax_types.Response(**r.json()[0])
    assert lx.details.finish_reason == "length" and lx.details.prompt_tokens == 3
    assert [a.text for a in lx.details.tokens[0].alternative_tokens] == ["x", "y"]
    r = client.post("/", json={"inputs": "ab", "parameters": {"max_new_tokens": 2}, "stream": True})
    events = [tg_types.StreamResponse(**e) for e in sse_events(r.text)]
    assert events[-1].details.finish_reason == "length" and events[-1].generated_text == "ab"
    events = [lorax_types.StreamResponse(**e) for e in sse_events(r.text)]
    assert not events[0].token.special


def test_info_has_tgis_fields(app):
    client, _ = app
    info = client.get("/info").json()
    assert info["model_id"] == "fake-base"
    assert (info["max_input_tokens"], info["max_total_tokens"]) == (63, 64)
    assert info["max_stop_sequences"] == 8 and info["model_device_type"] == "cpu"
    assert info["model_dtype"] == "torch.float32" and info["max_best_of"] == 1
    # the fake engine's context (64) x the default batch size (32)
    assert info["max_batch_size"] == 32 and info["max_batch_total_tokens"] == 2048


def test_info_batch_total_tokens_is_what_the_kv_pool_holds(app):
    client, engine = app
    engine.kv_capacity_tokens = 100  # fewer than 64 tokens x max_batch_size rows
    assert client.get("/info").json()["max_batch_total_tokens"] == 100


def test_errors_are_flat_on_tgi_routes_nested_elsewhere(app):
    client, _ = app
    r = client.post("/", json={"inputs": "x", "parameters": {"max_token": 5}})
    assert r.status_code == 422
    assert r.json()["error_type"] == "validation" and r.json()["param"] == "parameters.max_token"
    assert r.json()["error"].startswith("parameters.max_token")
    r = client.post("/", json={"inputs": "x", "parameters": {"adapter_id": "nope"}})
    assert r.status_code == 404 and "nope" in r.json()["error"]
    r = client.post("/generate", json={"inputs": "x", "stream_me": True})
    assert r.status_code == 422 and r.json()["param"] == "stream_me"
    r = client.post("/v1/completions", json={"model": "fake-base", "prompt": "x", "n": 2})
    assert r.status_code == 422 and r.json()["error"]["param"] == "n"


@pytest.mark.parametrize(
    "params",
    [
        {"adapter_source": "hub"},  # no network here
        {"frequency_penalty": 0.5},
        {"watermark": True},
        {"typical_p": 0.5},
        {"best_of": 2},
    ],
)
def test_declared_but_unhonoured_fields_are_422(app, params):
    client, engine = app
    n = len(engine.requests)
    r = client.post("/", json={"inputs": "x", "parameters": params})
    assert r.status_code == 422, r.text
    assert r.json()["param"] == f"parameters.{next(iter(params))}"
    assert len(engine.requests) == n


def test_nulls_the_clients_send_are_accepted(app):
    client, _ = app
    nulls = {
        k: None
        for k in [
            "adapter_source",
            "merged_adapters",
            "api_token",
            "response_format",
            "grammar",
            "frequency_penalty",
            "typical_p",
            "best_of",
            "truncate",
            "top_n_tokens",
            "stop",
        ]
    }
    r = client.post("/", json={"inputs": "ab", "parameters": {**nulls, "max_new_tokens": 2}})
    assert r.status_code == 200, r.text
    r = client.post("/", json={"inputs": "ab", "parameters": None})
    assert r.status_code == 200, r.text


def test_truncate_keeps_the_last_tokens_and_flags_reach_the_engine(app):
    client, engine = app
    params = {"truncate": 3, "ignore_eos_token": True, "repetition_penalty": 1.3, "seed": 7}
    r = client.post("/", json={"inputs": "abcdef", "parameters": {**params, "max_new_tokens": 3}})
    assert r.json()[0]["generated_text"] == "def"
    request = engine.requests[-1]
    assert request.prompt_ids == list(b"def")
    assert request.params.ignore_eos and request.params.repetition_penalty == 1.3
    assert request.params.seed == 7
    r = client.post("/", json={"inputs": "ab", "parameters": {"return_full_text": True}})
    assert r.json()[0]["generated_text"].startswith("ab") and len(r.json()[0]["generated_text"]) > 2


def test_finish_reasons_are_tgis_three(app):
    from flora_server.api.generate import _TGI_REASON

    assert set(_TGI_REASON.values()) == {"length", "eos_token", "stop_sequence"}
    client, _ = app
    body = {"inputs": "abcd", "parameters": {"stop": ["c"], "max_new_tokens": 8}}
    assert client.post("/", json=body).json()[0]["details"]["finish_reason"] == "stop_sequence"
