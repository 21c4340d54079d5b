"""Sampling parameters and grammars that used to fail inside the engine (a 500), through the
routes of an app serving the tiny Llama on both text engines: a repetition penalty that
float32 rounds to 0, a grammar with `ignore_eos_token`, a grammar that reaches a dead end,
and TGI's empty JSON schema."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator

import pytest
from api_fakes import sse_events
from fastapi.testclient import TestClient
from test_engine import PAGED_TINY, make_engine
from test_engine_batch import greedy_alone
from tiny_engine import TinyLoaded, make_char_tokenizer, make_tiny_llama

from flora_server.engine.constraints import ConstraintSpec
from flora_server.engine.llm_engine import LLMEngine
from flora_server.engine.paged.engine import PagedLLMEngine
from flora_server.engine.protocol import (
    EngineError,
    FinishEvent,
    GenerationRequest,
    GrammarDeadEndError,
    SamplingParams,
)
from flora_server.main import create_app
from flora_server.settings import Settings

pytestmark = pytest.mark.timeout(300)

DEAD_END = r"ab[^\s\S]"  # nothing matches: after "ab" no character and not the end
LEAKS = ("RuntimeError", "ValueError", "xgrammar", "grammar_matcher", "probability tensor")


@pytest.fixture(scope="module", params=["v1", "v2"])
def client(request, tmp_path_factory) -> Iterator[TestClient]:
    def factory(settings, registry, metrics):  # type: ignore[no-untyped-def]
        loaded = TinyLoaded(model=make_tiny_llama(), preprocessor=make_char_tokenizer())
        if request.param == "v2":
            return PagedLLMEngine(loaded, registry, metrics=metrics, **PAGED_TINY), None
        return LLMEngine(loaded, registry, metrics=metrics), None

    home = tmp_path_factory.mktemp("home")
    with TestClient(create_app(Settings(home=home), engine_factory=factory)) as c:
        deadline = time.monotonic() + 60
        while c.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, c.get("/ready").text
            time.sleep(0.02)
        yield c


def _generate(client: TestClient, inputs: str = "x", path: str = "/generate", **parameters):
    return client.post(path, json={"inputs": inputs, "parameters": parameters})


def _completion(client: TestClient, **fields):
    return client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "x", **fields})


def test_a_repetition_penalty_outside_0_01_to_100_is_422_naming_the_field(client) -> None:
    r = _completion(client, prompt="Hi Hi Hi", max_tokens=4, repetition_penalty=1e-300, seed=1)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == "repetition_penalty"
    assert error["message"] == "repetition_penalty: Input should be greater than or equal to 0.01"
    for penalty in (1e-40, 0.0099, 100.5):
        r = _generate(client, "Hi Hi", repetition_penalty=penalty, do_sample=True)
        assert r.status_code == 422, (penalty, r.text)
        assert r.json()["param"] == "parameters.repetition_penalty"
    # Both bounds are served, sampled and greedy: the penalised logits stay finite (through
    # EOS, which a sampled row may draw, so every request runs its 6 tokens).
    for penalty in (0.01, 100.0):
        for sample in (True, False):
            r = _generate(
                client, "Hi Hi", repetition_penalty=penalty, do_sample=sample, max_new_tokens=6,
                ignore_eos_token=True, seed=3,
            )  # fmt: skip
            assert r.status_code == 200, (penalty, r.text)
            assert r.json()["details"]["generated_tokens"] == 6


def test_a_grammar_ends_its_row_at_its_end_despite_ignore_eos_token(client) -> None:
    """The grammar's end is the request's end (`eos_token`), ignore_eos_token or not; the
    stream ends the same way, without an error event."""
    for grammar, check in (
        ({"type": "regex", "value": "(ab|ba)c{2}"}, lambda t: re.fullmatch("(ab|ba)c{2}", t)),
        (
            {
                "type": "json",
                "value": {
                    "type": "object",
                    "properties": {"a": {"type": "boolean"}},
                    "required": ["a"],
                },
            },
            lambda t: isinstance(json.loads(t)["a"], bool),
        ),
    ):
        params = {"max_new_tokens": 30, "ignore_eos_token": True, "grammar": grammar}
        r = _generate(client, "Give me JSON:", **params)
        assert r.status_code == 200, r.text
        answer = r.json()
        text, details = answer["generated_text"], answer["details"]
        assert check(text), text
        assert details["finish_reason"] == "eos_token"
        assert details["generated_tokens"] == len(text) + 1  # one token a character, then EOS
        assert details["tokens"][-1]["special"] is True
        events = sse_events(_generate(client, "Give me JSON:", "/generate_stream", **params).text)
        assert all("error" not in e for e in events), events
        assert events[-1]["generated_text"] == text
        assert events[-1]["details"]["finish_reason"] == "eos_token"


def test_an_unsatisfiable_grammar_is_a_422_naming_it_never_a_500(client) -> None:
    message = "parameters.grammar: no output can match the regular expression"
    for sample in (False, True):
        grammar = {"type": "regex", "value": DEAD_END}
        r = _generate(client, max_new_tokens=8, do_sample=sample, grammar=grammar)
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["error"].startswith(message) and body["error_type"] == "validation"
        assert body["param"] == "parameters.grammar"
        assert not any(leak in r.text for leak in LEAKS), r.text
    dead_end = {"type": "regex", "value": DEAD_END}
    r = _generate(client, "x", "/generate_stream", max_new_tokens=8, grammar=dead_end)
    events = sse_events(r.text)
    # every token generated, then the error (the route holds a token back to put `details`
    # on the last one, and sends it before the error)
    assert "".join(e["token"]["text"] for e in events[:-1]) == "ab", events
    assert events[-1]["error"].startswith(message), events[-1]
    assert events[-1]["error_type"] == "validation"
    assert not any(leak in r.text for leak in LEAKS), r.text
    # The OpenAI shape: response_format's schema pattern, named as the field it came from.
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "string", "pattern": DEAD_END}},
    }
    r = _completion(client, max_tokens=8, response_format=fmt)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "response_format")
    assert error["message"].startswith("response_format: no output can match the JSON schema")
    events = sse_events(_completion(client, max_tokens=8, response_format=fmt, stream=True).text)
    assert events[-1] == "[DONE]"
    assert [e["choices"][0]["text"] for e in events[:-2]] == ['"', "a", "b"]
    assert events[-2]["error"]["type"] == "invalid_request_error"
    assert events[-2]["error"]["message"].startswith("response_format: no output can match")
    # The server goes on serving.
    r = _generate(client, max_new_tokens=4)
    assert r.status_code == 200 and r.json()["details"]["generated_tokens"] == 4


def test_an_empty_json_schema_grammar_is_enforced_as_any_json(client) -> None:
    """`{}` accepts any JSON value: TGI's grammar and OpenAI's json_schema enforce it."""
    free = _generate(client, max_new_tokens=16)
    assert free.status_code == 200
    with pytest.raises(ValueError):
        json.loads(free.json()["generated_text"])  # the tiny model's own text is not JSON
    for kind in ("json", "json_object"):
        r = _generate(client, max_new_tokens=16, grammar={"type": kind, "value": {}})
        assert r.status_code == 200, r.text
        text = r.json()["generated_text"]
        assert text != free.json()["generated_text"]
        json.loads(text)  # a JSON number here; the real model's JSON is in the integration test
    # OpenAI's json_schema with the same schema
    fmt = {"type": "json_schema", "json_schema": {"name": "any", "schema": {}}}
    free_text = _completion(client, max_tokens=16, temperature=0).json()["choices"][0]["text"]
    r = _completion(client, max_tokens=16, temperature=0, response_format=fmt)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert text != free_text
    json.loads(text)


def test_a_dead_end_row_fails_alone_and_its_neighbours_are_exact(engine_kind) -> None:
    """In one batch with free rows, the row whose grammar reaches a dead end gets the 422
    error; the others generate exactly their greedy tokens."""
    engine = make_engine({}, kind=engine_kind)
    prompts = [[9, 70, 3, 12], [40, 41, 42, 43], [5, 17, 33]]

    async def run() -> list:
        spec = ConstraintSpec("regex", pattern=DEAD_END, field="parameters.grammar")
        dead = GenerationRequest("dead", [5, 17], SamplingParams(max_new_tokens=8))
        dead.constraint = await engine.compile_constraint(spec)
        free = [
            GenerationRequest(f"free{i}", p, SamplingParams(max_new_tokens=6))
            for i, p in enumerate(prompts)
        ]

        async def one(request: GenerationRequest) -> list | EngineError:
            try:
                return [e async for e in engine.generate(request)]
            except EngineError as exc:
                return exc

        return await asyncio.gather(*(one(r) for r in [dead, *free]))

    try:
        dead_out, *free_out = asyncio.run(run())
    finally:
        asyncio.run(engine.shutdown(5))
    assert isinstance(dead_out, GrammarDeadEndError), dead_out
    assert dead_out.param == "parameters.grammar"
    model = make_tiny_llama()
    for prompt, events in zip(prompts, free_out, strict=True):
        assert isinstance(events[-1], FinishEvent), events
        assert list(events[-1].token_ids) == greedy_alone(model, prompt, 6)
