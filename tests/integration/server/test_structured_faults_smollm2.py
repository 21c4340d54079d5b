"""The attack run's reproductions on the real SmolLM2-135M-Instruct served in-process: a
repetition penalty that float32 rounds to 0, a grammar with `ignore_eos_token`, grammars
that no output can match, and TGI's empty JSON schema. Each is a clear answer (a 200 that
keeps to its grammar, or a 422 naming the field), never a 500. Also vLLM's extras that
the OpenAI routes honour (`guided_choice`, `guided_regex`, `guided_json`, `ignore_eos`),
which the server used to ignore without a word."""

from __future__ import annotations

import json
import re
import time

import pytest
from fastapi.testclient import TestClient

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

BASE = "smollm2-135m-instruct"
DEAD_END = r"ab[^\s\S]"
LEAKS = ("RuntimeError", "ValueError", "xgrammar", "grammar_matcher", "probability tensor")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from flora_server.main import create_app
    from flora_server.settings import Settings

    work = tmp_path_factory.mktemp("srv")
    settings = Settings(model=BASE, adapter_store=str(work / "store"), max_new_tokens=64)
    with TestClient(create_app(settings)) as c:
        deadline = time.monotonic() + 300
        while c.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, c.get("/ready").json()
            time.sleep(0.2)
        yield c


def _sse(text: str) -> list:
    return [
        block[len("data: ") :] if block == "data: [DONE]" else json.loads(block[len("data: ") :])
        for block in text.split("\n\n")
        if block.strip()
    ]


def test_a_tiny_repetition_penalty_is_422_naming_it(client) -> None:
    r = client.post(
        "/v1/completions",
        json={"model": BASE, "prompt": "Hi Hi Hi", "max_tokens": 4, "repetition_penalty": 1e-300,
              "temperature": 1, "seed": 1},
    )  # fmt: skip
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "repetition_penalty"
    params = {"repetition_penalty": 1e-40, "do_sample": True, "max_new_tokens": 3}
    r = client.post("/generate", json={"inputs": "Hi Hi", "parameters": params})
    assert r.status_code == 422, r.text
    assert r.json()["error"].startswith("parameters.repetition_penalty: ")
    params["repetition_penalty"] = 0.01  # the smallest accepted, sampled: served
    r = client.post("/generate", json={"inputs": "Hi Hi", "parameters": params})
    assert r.status_code == 200 and r.json()["details"]["generated_tokens"] == 3, r.text


def test_json_grammar_with_ignore_eos_token_ends_with_its_json(client) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    params = {"max_new_tokens": 12, "ignore_eos_token": True,
              "grammar": {"type": "json", "value": schema}}  # fmt: skip
    body = {"inputs": "Give me JSON:", "parameters": params}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    text = r.json()["generated_text"]
    assert isinstance(json.loads(text)["a"], int), text
    assert r.json()["details"]["finish_reason"] == "eos_token"
    events = _sse(client.post("/generate_stream", json=body).text)
    assert all("error" not in e for e in events), events
    assert events[-1]["generated_text"] == text
    assert events[-1]["details"]["finish_reason"] == "eos_token"


def test_a_grammar_no_output_can_match_is_422_naming_it(client) -> None:
    grammar = {"type": "regex", "value": DEAD_END}
    for sample in (False, True):
        params = {"max_new_tokens": 8, "do_sample": sample, "seed": 1, "grammar": grammar}
        r = client.post("/generate", json={"inputs": "x", "parameters": params})
        assert r.status_code == 422, r.text
        assert r.json()["param"] == "parameters.grammar"
        assert r.json()["error"].startswith("parameters.grammar: no output can match")
        assert not any(leak in r.text for leak in LEAKS), r.text
    params = {"max_new_tokens": 8, "grammar": grammar}
    r = client.post("/generate_stream", json={"inputs": "x", "parameters": params})
    last = _sse(r.text)[-1]
    assert last["error"].startswith("parameters.grammar: ") and last["error_type"] == "validation"
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "string", "pattern": DEAD_END}},
    }
    body = {"model": BASE, "prompt": "x", "max_tokens": 8, "response_format": fmt}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format" and error["type"] == "invalid_request_error"
    assert not any(leak in r.text for leak in LEAKS), r.text
    events = _sse(client.post("/v1/completions", json={**body, "stream": True}).text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["message"].startswith("response_format: no output can match")


# SmolLM2's chat format: asked for JSON, unconstrained it writes Python code instead.
CAT = (
    "<|im_start|>user\nGive me a small JSON object about a cat.<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.mark.parametrize("kind", ["json", "json_object"])
def test_an_empty_json_schema_grammar_gives_json(client, kind) -> None:
    """`{}` accepts any JSON value and is enforced: the answer is whole JSON ending at EOS
    (the model's own answer to CAT starts with a Python code block)."""
    free = client.post("/generate", json={"inputs": CAT, "parameters": {"max_new_tokens": 64}})
    assert free.json()["generated_text"].startswith("```")
    params = {"max_new_tokens": 64, "grammar": {"type": kind, "value": {}}}
    r = client.post("/generate", json={"inputs": CAT, "parameters": params})
    assert r.status_code == 200, r.text
    assert r.json()["details"]["finish_reason"] == "eos_token", r.text
    assert isinstance(json.loads(r.json()["generated_text"])["name"], str), r.text


def _chat(client, content: str, **extra):  # type: ignore[no-untyped-def]
    body = {"model": BASE, "messages": [{"role": "user", "content": content}],
            "max_tokens": 40, "temperature": 0, **extra}  # fmt: skip
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_vllm_guided_decoding_extras_constrain_the_answer(client) -> None:
    """Free, the model answers in sentences; guided, exactly what was asked for."""
    question = "Is the sky blue? Answer in one word."
    free = _chat(client, question)["message"]["content"]
    choices = ["Absolutely", "Nope", "Maybe so"]
    assert free not in choices
    chosen = _chat(client, question, guided_choice=choices)
    assert chosen["message"]["content"] in choices and chosen["finish_reason"] == "stop"
    phone = _chat(client, "Give me a phone number.", guided_regex=r"\d{3}-\d{4}")
    assert re.fullmatch(r"\d{3}-\d{4}", phone["message"]["content"]), phone
    schema = {"type": "object", "properties": {"age": {"type": "integer"}},
              "required": ["age"], "additionalProperties": False}  # fmt: skip
    for given in (schema, json.dumps(schema)):  # an object, or a JSON string as vLLM takes
        answer = _chat(client, "How old is the universe?", guided_json=given)
        assert isinstance(json.loads(answer["message"]["content"])["age"], int), answer


def test_vllm_ignore_eos_generates_through_the_end_of_sequence(client) -> None:
    body = {"model": BASE, "prompt": "The capital of France is", "max_tokens": 48,
            "temperature": 0}  # fmt: skip
    stopped = client.post("/v1/completions", json=body).json()
    assert stopped["choices"][0]["finish_reason"] == "stop", stopped
    assert stopped["usage"]["completion_tokens"] < 48
    through = client.post("/v1/completions", json={**body, "ignore_eos": True}).json()
    assert through["choices"][0]["finish_reason"] == "length", through
    assert through["usage"]["completion_tokens"] == 48
    assert through["choices"][0]["text"].startswith(stopped["choices"][0]["text"])


def test_vllm_min_tokens_equals_transformers_min_new_tokens(client) -> None:
    """min_tokens holds EOS back as transformers' `min_new_tokens` does: the same greedy
    tokens, computed by transformers' own generate on the same weights."""
    import torch

    from flora.models import load

    loaded = load(BASE)
    prompt = loaded.preprocessor.encode("The capital of France is")
    body = {"model": BASE, "prompt": prompt, "max_tokens": 48, "temperature": 0}
    stopped = client.post("/v1/completions", json=body).json()
    n = stopped["usage"]["completion_tokens"]
    assert stopped["choices"][0]["finish_reason"] == "stop" and n < 40, stopped
    held = client.post("/v1/completions", json={**body, "min_tokens": n + 8}).json()
    with torch.no_grad():
        out = loaded.model.generate(
            torch.tensor([prompt]), max_new_tokens=48, min_new_tokens=n + 8, do_sample=False
        )[0, len(prompt) :].tolist()
    want = loaded.preprocessor.decode(out, skip_special_tokens=True)
    assert held["usage"]["completion_tokens"] == len(out) >= n + 8, held
    assert held["choices"][0]["text"] == want
