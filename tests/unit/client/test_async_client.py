"""`AsyncClient` against the stub server: every method, streaming, retries."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import httpx
import pytest
from flora_stub_server import BASE, StubState

from flora_client import AsyncClient, Conflict, NotFound, Overloaded, RetryPolicy, ValidationError


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_inference_methods(
    stub: StubState, stub_url: str, adapter_dir: Path, tmp_path: Path
) -> None:
    image = tmp_path / "img.jpg"
    image.write_bytes(b"12345678")  # 8 bytes: label index 2

    async def main() -> None:
        async with AsyncClient(stub_url) as client:
            await client.adapters.upload(adapter_dir, "ad")
            result = await client.generate("one two", adapter_id="ad", seed=3)
            assert result.generated_text == "[ad] two one"
            assert result.details is not None and result.details.seed == 3

            stream = await client.generate_stream("x y z")
            tokens = [e.token.text async for e in stream if e.token and not e.token.special]
            assert tokens == [" z", " y", " x"]

            completion = await client.complete("p q")
            assert completion.text == " q p" and stub.last_json["model"] == BASE
            chunks = await client.complete("p q", adapter_id="ad", stream=True)
            assert [c.text async for c in chunks] == ["[ad]", " q", " p", ""]

            reply = await client.chat([{"role": "user", "content": "hi you"}])
            assert reply.content == " you hi (turn 1)"
            chat_chunks = await client.chat([{"role": "user", "content": "hi"}], "ad", stream=True)
            assert "".join([c.content async for c in chat_chunks]) == "[ad] hi (turn 1)"

            vectors = (await client.embed(["aXa"], adapter_id="ad")).vectors
            assert vectors == [[3.0, 2.0, 1.0]]

            classes = await client.classify(image, top_k=3)
            assert [c.label for c in classes.results[0]] == ["fish", "cat", "dog"]

            models = await client.models()
            assert [(m.id, m.parent) for m in models.data] == [(BASE, None), ("ad", BASE)]

    run(main())


def test_adapters_probes_and_errors(stub: StubState, stub_url: str, adapter_dir: Path) -> None:
    blob = (adapter_dir / "adapter_config.json").read_bytes() + (
        adapter_dir / "adapter.safetensors"
    ).read_bytes()

    async def main() -> None:
        async with AsyncClient(stub_url) as client:
            first = await client.adapters.upload(adapter_dir, "a")
            second = await client.adapters.upload(adapter_dir, "a")
            assert (first.status, second.status) == ("created", "unchanged")
            assert first.sha256 == hashlib.sha256(blob).hexdigest()
            (adapter_dir / "adapter.safetensors").write_bytes(b"other")
            with pytest.raises(Conflict):
                await client.adapters.upload(adapter_dir, "a")
            assert (await client.adapters.get("a")).size_bytes == len(blob)
            assert [a.id for a in (await client.adapters.list()).data] == ["a"]
            await client.adapters.delete("a")
            with pytest.raises(NotFound):
                await client.adapters.get("a")
            with pytest.raises(ValidationError) as info:
                await client.generate("x", max_new_tokens=500)
            assert info.value.field == "parameters.max_new_tokens"
            assert await client.health() is True
            stub.ready = False
            assert await client.ready() is False
            stub.ready = True
            await client.wait_ready(timeout=2)
            assert (await client.metrics()).startswith("flora_requests_total")

    run(main())


def test_async_retry_and_no_retry(stub: StubState, stub_url: str, adapter_dir: Path) -> None:
    stub.fail_plan["POST /v1/chat/completions"] = [(429, "1.5"), (503, "0.5")]
    stub.fail_plan["POST /v1/adapters"] = [(429, "1")]
    sleeps: list[float] = []

    async def record(seconds: float) -> None:
        sleeps.append(seconds)

    async def main() -> None:
        policy = RetryPolicy(rand=lambda: 0.0)
        async with AsyncClient(stub_url, retry=policy, sleep=record, base_model=BASE) as client:
            reply = await client.chat([{"role": "user", "content": "a"}])
            assert reply.content == " a (turn 1)"
            with pytest.raises(Overloaded):
                await client.adapters.upload(adapter_dir, "a")

    run(main())
    assert stub.attempts["POST /v1/chat/completions"] == 3
    assert stub.attempts["POST /v1/adapters"] == 1
    assert sleeps == [1.5, 0.5]


def test_async_connect_error_retried_for_inference() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"generated_text": "fine"})

    async def nosleep(seconds: float) -> None:
        return None

    async def main() -> str:
        transport = httpx.MockTransport(handler)
        async with AsyncClient("http://x", transport=transport, sleep=nosleep) as client:
            return (await client.generate("p")).generated_text

    assert run(main()) == "fine"
    assert calls == 2
