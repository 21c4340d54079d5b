"""Property 11: a failure inside one request fails that request alone, and a dead engine
turns `/health` 503 and makes `flora-serve` exit non-zero.

All on the tiny random Llama in-process (no server process): a row whose adapter overflows
to non-finite logits, a batched prefill that fails (simulated out-of-memory) and is retried
row by row, and an engine worker thread killed by an injected fault."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import time
from typing import ClassVar

import httpx
import pytest
import torch
from api_fakes import fake_validator
from fastapi.testclient import TestClient
from tiny import free_port, server_fixtures

from flora_server import lifecycle
from flora_server.engine import stepper
from flora_server.engine.causal_batch import CausalBatch
from flora_server.engine.hooks import NullEngineMetrics
from flora_server.engine.llm_engine import LLMEngine
from flora_server.engine.paged.engine import PagedLLMEngine
from flora_server.engine.protocol import (
    AdapterLoadError,
    FinishEvent,
    GenerationRequest,
    RequestFailedError,
    SamplingParams,
    TokenEvent,
)
from flora_server.main import create_app
from flora_server.settings import Settings

pytestmark = pytest.mark.timeout(120)

STEPS = 6
PROMPTS = {"bad": [5, 17, 33], "good": [40, 41, 42, 43], "base": [9, 70, 3, 12]}


class StepRecorder(NullEngineMetrics):
    """Rows per forward step, in order (prefills and decodes)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_step(self, mode: str, batch_size: int, seconds: float) -> None:
        self.sizes.append(batch_size)


def overflowing_adapter(tmp_path, scale: float, name: str):
    """A FLoRA adapter on v_proj whose layer-0 core is `scale`. Every stored value is
    finite, so `flora.load_adapter` accepts it. With 1e38 the folded slot factors are still
    finite but the activations overflow float32 and the logits become NaN; with 3e38 the
    folded factors themselves overflow (refused before reaching a slot)."""
    import flora
    from flora.adapter import load_adapter, save_adapter

    fx = server_fixtures()
    model = fx.make_tiny_llama()
    flora.inject(model, flora.FloraConfig(target_modules=["v_proj"], rank=4))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        layers = list(flora.adapter_layers(model))
        for _, layer in layers:
            layer.core.copy_(torch.randn(layer.core.shape, generator=gen) * 0.6)
        layers[0][1].core.fill_(scale)
    return load_adapter(save_adapter(model, tmp_path / name, base_model_id="tiny-llama"))


def start_engine(adapters: dict, metrics=None, kind: str = "v1") -> LLMEngine:
    """v1 (`LLMEngine`) or v2 (`PagedLLMEngine`, a small pool) on the tiny Llama."""
    fx = server_fixtures()
    loaded = fx.TinyLoaded(model=fx.make_tiny_llama(), preprocessor=fx.make_char_tokenizer())
    if kind == "v2":
        engine: LLMEngine = PagedLLMEngine(
            loaded, fx.DictSource(adapters), metrics=metrics, kv_cache_bytes=1 << 20
        )
    else:
        engine = LLMEngine(loaded, fx.DictSource(adapters), metrics=metrics)
    engine.start()
    deadline = time.monotonic() + 30
    while not engine.ready:
        assert time.monotonic() < deadline, "engine did not become ready"
        time.sleep(0.01)
    return engine


def request(rid: str, prompt: list[int], adapter: str | None, n: int) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(max_new_tokens=n), adapter)


async def outcome(engine: LLMEngine, req: GenerationRequest) -> list[int] | Exception:
    """The generated token ids, or the request's own error."""
    tokens = []
    try:
        async for event in engine.generate(req):
            if isinstance(event, TokenEvent):
                tokens.append(event.token_id)
            else:
                assert isinstance(event, FinishEvent) and event.reason == "length"
    except (RequestFailedError, AdapterLoadError) as exc:
        return exc
    return tokens


async def together(engine: LLMEngine, reqs: list[GenerationRequest]) -> list:
    with server_fixtures().Held(engine):
        tasks = [asyncio.ensure_future(outcome(engine, r)) for r in reqs]
        await asyncio.sleep(0)  # every task has called generate(): all are in the inbox
    return await asyncio.gather(*tasks)


def references(good) -> dict[str, list[int]]:
    """Independent greedy references: full forwards on a fresh base and on flora's own
    merge of the good adapter."""
    fx = server_fixtures()
    from test_engine_batch import greedy_alone

    return {
        "good": greedy_alone(fx.merged_reference_model(good), PROMPTS["good"], STEPS),
        "base": greedy_alone(fx.make_tiny_llama(), PROMPTS["base"], STEPS),
    }


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    good = server_fixtures().make_flora_adapter(1, tmp)
    bad = overflowing_adapter(tmp, 1e38, "bad")
    huge = overflowing_adapter(tmp, 3e38, "huge")
    return {"good": good, "bad": bad, "huge": huge}, references(good)


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_non_finite_logits_fail_only_their_row(adapters, kind):
    torch.manual_seed(0)
    sources, expected = adapters
    steps = StepRecorder()
    engine = start_engine(sources, metrics=steps, kind=kind)
    try:

        async def main():
            # Put both adapters on device slots first, so all three rows join one prefill.
            warm = await together(
                engine, [request("w1", [5], "good", 1), request("w2", [5], "bad", 1)]
            )
            assert warm[0] != [] and isinstance(warm[1], RequestFailedError)
            steps.sizes.clear()
            reqs = [
                request(f"row-{k}", p, None if k == "base" else k, STEPS)
                for k, p in PROMPTS.items()
            ]
            return await together(engine, reqs)

        bad, good, base = asyncio.run(main())
        assert isinstance(bad, RequestFailedError), bad
        assert "row-bad" in str(bad) and "non-finite logits" in str(bad)
        assert good == expected["good"]
        assert base == expected["base"]
        # One prefill of all three rows (the bad one included; v2: one packed step of
        # three chunks), then two-row decodes.
        # A step is recorded after its tokens are emitted, so the warm-up's step may land
        # just after the clear and the last decode just after the answers: wait, then read
        # the tail.
        want = [3] + [2] * (STEPS - 1)
        deadline = time.monotonic() + 10
        while steps.sizes[-STEPS:] != want and time.monotonic() < deadline:
            time.sleep(0.01)
        assert steps.sizes[-STEPS:] == want and len(steps.sizes) <= STEPS + 1, steps.sizes
        assert engine.healthy and engine.stats().running == 0
    finally:
        asyncio.run(engine.shutdown(5))


def test_update_that_overflows_when_folded_never_reaches_a_slot(adapters):
    """3e38 folds to inf: a merge would write it into the base weight, and in the row mask
    of the torch "wide" fallback 0 * inf = NaN would poison every other row of the batch,
    so the adapter is refused (upload: 422 via the same check; here: its
    request fails with the load error) and the other rows are exact."""
    from flora.serving import ServingModel

    sources, expected = adapters
    serving = ServingModel(server_fixtures().make_tiny_llama(), max_slots=1)  # the rule alone
    serving.check(sources["bad"])  # finite once folded: served, fails per row
    with pytest.raises(ValueError, match="overflows float32"):
        serving.check(sources["huge"])
    torch.manual_seed(0)
    engine = start_engine(sources)
    try:

        async def main():
            await together(engine, [request("w", [5], "good", 1)])
            reqs = [
                request("row-huge", PROMPTS["bad"], "huge", STEPS),
                request("row-good", PROMPTS["good"], "good", STEPS),
                request("row-base", PROMPTS["base"], None, STEPS),
            ]
            return await together(engine, reqs)

        huge, good, base = asyncio.run(main())
        assert isinstance(huge, AdapterLoadError) and "overflows float32" in str(huge), huge
        assert good == expected["good"] and base == expected["base"]
        assert "huge" not in engine.cache.device_adapters()
    finally:
        asyncio.run(engine.shutdown(5))


class FlakyBatch(CausalBatch):
    """A prefill of more than one row fails as if out of memory; a prompt starting with
    token 77 fails even alone (the request's own fault)."""

    sizes: ClassVar[list[int]] = []

    @classmethod
    def prefill(cls, model, prompts, rows):  # type: ignore[override]
        cls.sizes.append(len(prompts))
        if len(prompts) > 1:
            raise torch.OutOfMemoryError("simulated: out of memory in a batched prefill")
        if prompts[0][0] == 77:
            raise RuntimeError("simulated: this prompt breaks the forward")
        return super().prefill(model, prompts, rows)


def test_failed_packed_step_is_retried_chunk_by_chunk(adapters):
    """Engine v2: a packed step whose forward raises runs each chunk alone; only the
    request whose chunk still fails alone is failed, the others finish exactly."""
    torch.manual_seed(0)
    sources, expected = adapters
    engine = start_engine({"good": sources["good"]}, kind="v2")
    runner = engine._stepper.runner  # type: ignore[attr-defined]
    real_run, sizes = runner.run, []

    def flaky_run(chunks, *args):
        sizes.append(len(chunks))
        if len(chunks) > 1 and any(c.start == 0 for c in chunks):  # a step with a prefill
            raise torch.OutOfMemoryError("simulated: out of memory in a packed step")
        if chunks[0].start == 0 and chunks[0].token_ids[0] == 77:
            raise RuntimeError("simulated: this prompt breaks the forward")
        return real_run(chunks, *args)

    try:
        reqs = [
            request("row-good", PROMPTS["good"], "good", STEPS),
            request("row-poison", [77, 1, 2], None, STEPS),
            request("row-base", PROMPTS["base"], None, STEPS),
        ]

        async def main():
            await together(engine, [request("w", [5], "good", 1)])  # slot loaded
            runner.run = flaky_run
            return await together(engine, reqs)

        good, poison, base = asyncio.run(main())
        assert sizes[:4] == [3, 1, 1, 1]  # the packed step failed, then each chunk alone
        assert sizes[4:] == [2] * (STEPS - 1)  # the two survivors decode packed
        assert good == expected["good"] and base == expected["base"]
        assert isinstance(poison, RequestFailedError)
        assert "row-poison" in str(poison) and "breaks the forward" in str(poison)
        assert engine.healthy
        deadline = time.monotonic() + 10  # the blocks are released after the last event
        while engine.pool.num_used and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.01)
        assert engine.pool.num_used == 0  # type: ignore[attr-defined]
    finally:
        asyncio.run(engine.shutdown(5))


def test_failed_batched_prefill_is_retried_row_by_row(adapters, monkeypatch):
    torch.manual_seed(0)
    sources, expected = adapters
    monkeypatch.setattr(stepper, "CausalBatch", FlakyBatch)
    FlakyBatch.sizes = []
    engine = start_engine({"good": sources["good"]})
    try:
        reqs = [
            request("row-good", PROMPTS["good"], "good", STEPS),
            request("row-poison", [77, 1, 2], None, STEPS),
            request("row-base", PROMPTS["base"], None, STEPS),
        ]

        async def main():
            await together(engine, [request("w", [5], "good", 1)])  # slot loaded
            FlakyBatch.sizes = []
            return await together(engine, reqs)

        good, poison, base = asyncio.run(main())
        assert FlakyBatch.sizes == [3, 1, 1, 1]  # the batch failed, then each row alone
        assert good == expected["good"] and base == expected["base"]
        assert isinstance(poison, RequestFailedError)
        assert "row-poison" in str(poison) and "breaks the forward" in str(poison)
        assert engine.healthy
    finally:
        asyncio.run(engine.shutdown(5))


def tiny_engine_factory(holder: dict):
    def factory(settings, registry, metrics):
        fx = server_fixtures()
        loaded = fx.TinyLoaded(model=fx.make_tiny_llama(), preprocessor=fx.make_char_tokenizer())
        holder["engine"] = LLMEngine(loaded, registry, metrics=metrics)
        return holder["engine"], fake_validator

    return factory


def kill_worker(engine: LLMEngine) -> None:
    """Inject a fault outside the per-step error handling: the worker thread dies."""

    def boom() -> None:
        raise RuntimeError("injected fault: the engine worker dies")

    engine.cache.apply_invalidations = boom  # type: ignore[method-assign]
    engine._wake()


def wait_running(engine: LLMEngine, n: int) -> None:
    deadline = time.monotonic() + 20
    while engine.stats().running != n:
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_engine_fails_in_flight_requests_and_health_turns_503(tmp_path):
    torch.manual_seed(0)
    holder: dict = {}
    app = create_app(Settings(home=tmp_path / "home"), engine_factory=tiny_engine_factory(holder))
    with TestClient(app) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        deadline = time.monotonic() + 30
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.get("/health").status_code == 200
        body = {"inputs": "hello", "parameters": {"max_new_tokens": 200}}
        pending = pool.submit(client.post, "/generate", json=body)
        engine = holder["engine"]
        wait_running(engine, 1)
        kill_worker(engine)
        r = pending.result(30)
        assert r.status_code == 500, r.text
        error = r.json()  # TGI's flat shape on /generate
        assert error["error_type"] == "generation"
        assert re.search(r"request gen-[0-9a-f]{32} failed", error["error"]), error
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["error"]["type"] == "engine_dead"
        assert client.get("/ready").status_code == 503


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_engine_makes_the_server_exit_with_status_3(tmp_path):
    """`lifecycle.serve` (what `flora-serve` runs; its return value is the exit status)
    notices the dead worker and returns ENGINE_DEAD_EXIT without any signal."""
    torch.manual_seed(0)
    holder: dict = {}
    settings = Settings(home=tmp_path / "home", port=free_port(), log_level="warning")
    app = create_app(settings, engine_factory=tiny_engine_factory(holder))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        served = pool.submit(lifecycle.serve, app, settings)
        url = f"http://127.0.0.1:{settings.port}"
        deadline = time.monotonic() + 30
        while True:
            assert not served.done(), served.result()
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        killed = time.monotonic()
        kill_worker(holder["engine"])
        assert served.result(30) == lifecycle.ENGINE_DEAD_EXIT != 0
        assert time.monotonic() - killed < 10


def test_a_failed_start_up_makes_the_server_exit_with_status_4(tmp_path, caplog):
    """A model that cannot load ends the process (it would otherwise live on unready, which
    a liveness probe and Docker's health check call healthy)."""

    def broken(settings, registry, metrics):
        raise FileNotFoundError("no model at /nowhere")

    settings = Settings(home=tmp_path / "home", port=free_port(), log_level="warning")
    app = create_app(settings, engine_factory=broken)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        assert pool.submit(lifecycle.serve, app, settings).result(30) == 4
    assert lifecycle.STARTUP_FAILED_EXIT == 4 != lifecycle.ENGINE_DEAD_EXIT
    assert time.monotonic() - started < 20
    assert "start-up failed: exiting with status 4" in caplog.text


@pytest.mark.parametrize("taken", ["port", "probe_port"])
def test_a_port_in_use_ends_start_up_at_once_with_status_4(tmp_path, caplog, taken):
    """Both ports are bound before the model loads: a taken one is one log line and exit
    status 4, not a traceback after the load (the probe's) or uvicorn's status 3, which
    reads as a dead engine."""
    import socket

    loaded = []

    def factory(settings, registry, metrics):  # never reached
        loaded.append(True)
        raise AssertionError("the model loaded before the ports were bound")

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        ports = {"port": free_port(), "probe_port": free_port(), taken: busy}
        settings = Settings(home=tmp_path / "home", log_level="warning", **ports)
        app = create_app(settings, engine_factory=factory)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            assert pool.submit(lifecycle.serve, app, settings).result(30) == 4
    assert not loaded
    assert f"cannot listen on 127.0.0.1:{busy}: exiting with status 4" in caplog.text
    assert "Traceback" not in caplog.text


def test_an_update_whose_outputs_overflow_is_refused_at_upload(adapters):
    """The 1e38 adapter is finite stored and folded, so a request that loads it fails its
    own rows (above); at upload the engine refuses it, naming the module, so it is a 422
    and never stored."""
    sources, _ = adapters
    engine = start_engine(sources)
    try:
        engine.check_adapter(sources["good"])
        with pytest.raises(ValueError, match=r"v_proj: the update multiplies inputs of size 1"):
            engine.check_adapter(sources["bad"])
    finally:
        asyncio.run(engine.shutdown(5))


def test_a_host_name_listens_on_every_address_it_resolves_to():
    """As uvicorn's own `create_server(host=...)` did before the ports were bound early:
    `localhost` is every loopback address the resolver gives (127.0.0.1, and ::1 where
    IPv6 is configured), each socket bound to the same port."""
    import socket

    import uvicorn

    port = free_port()
    config = uvicorn.Config(None, host="localhost", port=port)
    sockets = lifecycle._listen(config)
    try:
        assert sockets is not None
        got = {(s.family, s.getsockname()[0]) for s in sockets}
        want = {
            (info[0], info[4][0])
            for info in socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)
        }
        assert got == want and len(got) >= 1
        assert {s.getsockname()[1] for s in sockets} == {port}
    finally:
        for s in sockets or ():
            s.close()


def test_a_worker_that_dies_while_warming_up_is_a_failed_start_up():
    """The watchdog sees the dead worker and the start-up error together: before the engine
    is warm that is a failed start-up (status 4), after it a dead engine (status 3)."""
    import types

    import uvicorn

    def watched(warmed: bool) -> int:
        engine = types.SimpleNamespace(healthy=False)
        state = types.SimpleNamespace(engine=engine, warmed=warmed, startup_error=None)
        if not warmed:
            state.startup_error = "RuntimeError: the engine stopped during warm-up"
        app = types.SimpleNamespace(state=state)
        server = lifecycle.DrainingServer(uvicorn.Config(None), app, 1.0)
        server._watch()  # returns once it decided
        assert server.should_exit
        return server.exit_code

    assert watched(warmed=False) == lifecycle.STARTUP_FAILED_EXIT
    assert watched(warmed=True) == lifecycle.ENGINE_DEAD_EXIT
