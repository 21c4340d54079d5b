"""Property 17: one request cannot kill the server.

Every numeric field is bounded in the request schemas by what the engine takes (a 422 naming
the field, before anything is queued), and whatever admitting or sampling one row raises in
the engine worker fails that row alone while the others complete with their exact tokens.
The attack of the report: `seed` = 2^64 used to overflow `torch.Generator.manual_seed` on the
worker thread, which died and took the process down (exit 3)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time

import pytest
import torch
from api_fakes import running_app
from fastapi.testclient import TestClient
from test_engine_batch import greedy_alone
from test_sec_engine_faults import (
    STEPS,
    outcome,
    request,
    start_engine,
    tiny_engine_factory,
    together,
)
from tiny import api_error, server_fixtures

from flora_server.engine import stepper
from flora_server.engine.protocol import GenerationRequest, RequestFailedError, SamplingParams
from flora_server.main import create_app
from flora_server.settings import Settings

pytestmark = pytest.mark.timeout(120)

JSON = {"content-type": "application/json"}
BIG = 2**64  # one past torch's largest seed
HUGE = 2**40  # past int32


def _chat(**fields: object) -> dict:
    return {"model": "fake-base", "messages": [{"role": "user", "content": "hi"}], **fields}


def _tgi(**parameters: object) -> dict:
    return {"inputs": "hi", "parameters": parameters}


# (route, body, the field the 422 must name). Bodies are sent as raw JSON text so that
# Infinity and NaN literals (which Python's JSON parser accepts) reach the schemas.
OUT_OF_RANGE = [
    ("/generate", _tgi(seed=BIG, do_sample=True), "parameters.seed"),
    ("/generate_stream", _tgi(seed=BIG, do_sample=True), "parameters.seed"),
    ("/generate", _tgi(seed=-1), "parameters.seed"),
    ("/generate", _tgi(max_new_tokens=HUGE), "parameters.max_new_tokens"),
    ("/generate", _tgi(top_k=HUGE), "parameters.top_k"),
    ("/generate", _tgi(temperature=float("inf")), "parameters.temperature"),
    ("/generate", _tgi(temperature=1e300), "parameters.temperature"),
    ("/generate", _tgi(repetition_penalty=float("nan")), "parameters.repetition_penalty"),
    # 1e-40 is 0 in float32: the penalised logits were inf and NaN, and sampling raised
    ("/generate", _tgi(repetition_penalty=1e-40, do_sample=True), "parameters.repetition_penalty"),
    ("/generate", _tgi(repetition_penalty=0.0099), "parameters.repetition_penalty"),
    ("/generate", _tgi(repetition_penalty=100.01), "parameters.repetition_penalty"),
    ("/generate", _tgi(top_p=float("nan")), "parameters.top_p"),
    ("/generate", _tgi(truncate=HUGE), "parameters.truncate"),
    ("/generate", _tgi(best_of=HUGE), "parameters.best_of"),
    ("/v1/completions", {"model": "fake-base", "prompt": "hi", "seed": BIG}, "seed"),
    (
        "/v1/completions",
        {"model": "fake-base", "prompt": "hi", "repetition_penalty": 1e-300, "temperature": 1},
        "repetition_penalty",
    ),
    ("/v1/completions", {"model": "fake-base", "prompt": [5, HUGE]}, "prompt.1"),
    ("/v1/completions", {"model": "fake-base", "prompt": [-3]}, "prompt.0"),
    ("/v1/completions", {"model": "fake-base", "prompt": "hi", "max_tokens": HUGE}, "max_tokens"),
    ("/v1/completions", {"model": "fake-base", "prompt": "hi", "logprobs": HUGE}, "logprobs"),
    ("/v1/completions", {"model": "fake-base", "prompt": "hi", "n": HUGE}, "n"),
    ("/v1/chat/completions", _chat(seed=BIG), "seed"),
    ("/v1/chat/completions", _chat(seed=BIG, stream=True), "seed"),
    ("/v1/chat/completions", _chat(top_k=HUGE), "top_k"),
    ("/v1/chat/completions", _chat(repetition_penalty=float("inf")), "repetition_penalty"),
    ("/v1/chat/completions", _chat(temperature=float("nan")), "temperature"),
    ("/v1/chat/completions", _chat(presence_penalty=float("nan")), "presence_penalty"),
    ("/v1/chat/completions", _chat(max_completion_tokens=HUGE), "max_completion_tokens"),
    ("/v1/chat/completions", _chat(top_logprobs=HUGE), "top_logprobs"),
]


def test_out_of_range_numbers_are_422_naming_the_field_before_queueing(tmp_path):
    with running_app(tmp_path) as (client, engine):
        for path, body, param in OUT_OF_RANGE:
            raw = json.dumps(body)  # inf/nan become the Infinity/NaN literals
            r = client.post(path, content=raw, headers=JSON)
            assert r.status_code == 422, (path, body, r.text)
            error = api_error(r)
            assert error["param"] == param, (path, body, error)
            assert error["message"].startswith(f"{param}: "), error
        assert engine.requests == []  # nothing reached the engine
        # The largest seed torch takes is served, and reported back.
        top = client.post("/generate", json=_tgi(seed=BIG - 1, do_sample=True, max_new_tokens=2))
        assert top.status_code == 200, top.text
        assert top.json()["details"]["seed"] == BIG - 1
        assert engine.requests[-1].params.seed == BIG - 1


def test_seed_overflow_on_a_real_worker_is_422_and_the_server_keeps_serving(tmp_path):
    """The report's attack against the real engine worker: each one a 422, never a 500, and
    after them /health is 200 and a greedy request still returns the reference tokens."""
    torch.manual_seed(0)
    holder: dict = {}
    app = create_app(Settings(home=tmp_path / "home"), engine_factory=tiny_engine_factory(holder))
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for path, body in [
            ("/generate", _tgi(seed=BIG, do_sample=True)),
            ("/generate_stream", _tgi(seed=BIG, do_sample=True)),
            ("/v1/completions", {"model": "tiny", "prompt": "hi", "seed": BIG}),
            ("/v1/chat/completions", {**_chat(seed=BIG), "model": "tiny"}),
        ]:
            r = client.post(path, json=body)
            assert r.status_code == 422, (path, r.text)
        engine = holder["engine"]
        assert engine.healthy and client.get("/health").status_code == 200
        r = client.post("/generate", json=_tgi(max_new_tokens=STEPS, details=True))
        assert r.status_code == 200, r.text
        prompt = asyncio.run(engine.tokenize("hi"))
        expected = greedy_alone(server_fixtures().make_tiny_llama(), prompt, STEPS)
        assert [t["id"] for t in r.json()["details"]["tokens"]] == expected


def _reference(prompt: list[int]) -> list[int]:
    return greedy_alone(server_fixtures().make_tiny_llama(), prompt, STEPS)


def test_a_row_that_fails_admission_fails_alone_on_the_real_worker():
    """Past the schemas (a direct engine caller): the seed torch refuses fails its own
    request with a 500-class error naming it, while a request admitted in the same
    iteration completes with the exact greedy tokens, and the worker stays alive."""
    torch.manual_seed(0)
    engine = start_engine({})
    try:
        bad = GenerationRequest(
            "row-seed", [5, 17, 33], SamplingParams(STEPS, do_sample=True, seed=BIG), None
        )

        async def main():
            first = await together(engine, [bad, request("row-good", [9, 70, 3, 12], None, STEPS)])
            after = await outcome(engine, request("row-after", [40, 41, 42, 43], None, STEPS))
            return first, after

        (failed, good), after = asyncio.run(main())
        assert isinstance(failed, RequestFailedError), failed
        assert "row-seed" in str(failed) and "Overflow" in str(failed)
        assert good == _reference([9, 70, 3, 12])
        assert after == _reference([40, 41, 42, 43])
        assert engine.healthy and engine.stats().running == 0 and engine.stats().waiting == 0
    finally:
        asyncio.run(engine.shutdown(5))


def test_a_sampling_failure_in_a_decode_step_fails_only_its_row(monkeypatch):
    """Sampling a batch raises inside a decode step (the row's own fault, simulated): the
    batch is sampled row by row, the culprit fails alone, its neighbours' tokens are exact."""
    real = stepper._select

    def flaky(rows, logits, eos_ids):
        if any(r.request.request_id == "row-poison" and len(r.generated) >= 2 for r in rows):
            raise RuntimeError("simulated: sampling this row fails")
        return real(rows, logits, eos_ids)

    monkeypatch.setattr(stepper, "_select", flaky)
    torch.manual_seed(0)
    engine = start_engine({})
    try:
        reqs = [
            request("row-poison", [5, 17, 33], None, STEPS),
            request("row-a", [9, 70, 3, 12], None, STEPS),
            request("row-b", [40, 41, 42, 43], None, STEPS),
        ]
        poison, a, b = asyncio.run(together(engine, reqs))
        assert isinstance(poison, RequestFailedError), poison
        assert "row-poison" in str(poison) and "sampling this row fails" in str(poison)
        assert a == _reference([9, 70, 3, 12]) and b == _reference([40, 41, 42, 43])
        assert engine.healthy
    finally:
        asyncio.run(engine.shutdown(5))


def test_a_failed_batch_forward_of_the_encoder_fails_only_its_request(tmp_path, monkeypatch):
    """The image/text-encoder worker: a batched forward that raises is retried request by
    request; the request that breaks it gets a 500 alone, the others their exact vectors."""
    from test_encoder_engine import TinyEncoderLoaded, make_bert, reference

    from flora_server.engine.encoder import EncoderEngine
    from tests.unit.server.conftest import make_char_tokenizer

    sizes: list[int] = []
    real = EncoderEngine.run_batch

    def flaky(self, jobs):
        sizes.append(len(jobs))
        if any("poison" in job.inputs for job in jobs):
            raise RuntimeError("simulated: this input breaks the forward")
        return real(self, jobs)

    monkeypatch.setattr(EncoderEngine, "run_batch", flaky)

    def factory(settings, registry, metrics):
        loaded = TinyEncoderLoaded(make_bert(), make_char_tokenizer())
        return EncoderEngine(loaded, registry, max_slots=2, max_wait=0.5), lambda path: None

    app = create_app(Settings(home=tmp_path / "home"), engine_factory=factory)
    texts = ["abc", "poison", "hello there"]
    with TestClient(app) as client, concurrent.futures.ThreadPoolExecutor(3) as pool:
        deadline = time.monotonic() + 30
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        sizes.clear()
        futures = [pool.submit(client.post, "/v1/embeddings", json={"input": t}) for t in texts]
        good_a, poison, good_b = (f.result(60) for f in futures)
        assert max(sizes) > 1, sizes  # they shared a forward, which failed
        assert poison.status_code == 500 and poison.json()["error"]["type"] == "server_error"
        assert "breaks the forward" in poison.json()["error"]["message"]
        for r, text in ((good_a, "abc"), (good_b, "hello there")):
            assert r.status_code == 200, r.text
            got = torch.tensor(r.json()["data"][0]["embedding"])
            torch.testing.assert_close(got, reference([text])[0], rtol=0, atol=1e-5)
        # Numbers and text are checked before this engine too (property 18 for the text).
        for body, param in [
            ({"input": "abc", "dimensions": HUGE}, "dimensions"),
            ({"input": ["ok", "a\ud800"]}, "input.1"),
        ]:
            r = client.post("/v1/embeddings", content=json.dumps(body), headers=JSON)
            assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text
        assert client.get("/health").status_code == 200


def test_a_failed_decode_fails_its_rows_and_the_newly_admitted_row_still_runs(monkeypatch):
    """A decode forward that raises (simulated) leaves the culprit unknown: the running row
    fails, while the request admitted in that same iteration is prefilled on its own and
    returns its exact tokens, and the worker keeps serving."""
    from flora_server.engine.causal_batch import CausalBatch

    class FlakyDecode(CausalBatch):
        armed = False

        def decode(self, model):  # type: ignore[override]
            if FlakyDecode.armed:
                FlakyDecode.armed = False
                raise RuntimeError("simulated: the decode forward fails")
            return super().decode(model)

    real_step = stepper.Stepper.step
    fired: list[bool] = []

    def step(self, admitted, waiting):  # type: ignore[no-untyped-def]
        # Fail the decode of exactly the step that also admits row-new.
        new = any(r.request.request_id == "row-new" for r in admitted)
        if self.batch is not None and new and not fired:
            fired.append(True)
            FlakyDecode.armed = True
        return real_step(self, admitted, waiting)

    monkeypatch.setattr(stepper, "CausalBatch", FlakyDecode)
    monkeypatch.setattr(stepper.Stepper, "step", step)
    torch.manual_seed(0)
    engine = start_engine({})
    try:

        async def main():
            running = asyncio.ensure_future(outcome(engine, request("row-run", [5, 17], None, 250)))
            deadline = time.monotonic() + 20
            while engine.stats().running != 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            new = await outcome(engine, request("row-new", [9, 70, 3, 12], None, STEPS))
            after = await outcome(engine, request("row-after", [40, 41, 42, 43], None, STEPS))
            return await running, new, after

        failed, new, after = asyncio.run(main())
        assert fired, "row-new was not admitted while row-run was running"
        assert isinstance(failed, RequestFailedError) and "decode forward fails" in str(failed)
        assert new == _reference([9, 70, 3, 12]) and after == _reference([40, 41, 42, 43])
        assert engine.healthy
    finally:
        asyncio.run(engine.shutdown(5))
