"""SDK conventions: typed keyword parameters (a typo is a TypeError), per-call timeout and
extra headers, closable streams, default timeouts matched to the server's, and the CLI's
`--temperature 0` (greedy)."""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from flora_client import AsyncClient, Client, cli
from flora_client._core import DEFAULT_TIMEOUT, SERVER_REQUEST_TIMEOUT
from flora_client.cli import app


def _events(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        token = {"id": i, "text": f"t{i}", "logprob": -0.5, "special": False}
        last = i == n - 1
        event = {
            "index": i,
            "token": token,
            "generated_text": "".join(f"t{j}" for j in range(n)) if last else None,
            "details": {"finish_reason": "length", "generated_tokens": n} if last else None,
        }
        out.append(f"data: {json.dumps(event)}\n\n".encode())
    return out


class CountingStream(httpx.SyncByteStream):
    """An SSE body that records how many events were read and whether it was closed."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.sent = 0
        self.closed = False

    def __iter__(self):
        for chunk in self.chunks:
            self.sent += 1
            yield chunk

    def close(self) -> None:
        self.closed = True


def recording_client(seen: list[httpx.Request], body: CountingStream | None = None) -> Client:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if body is not None:
            return httpx.Response(200, stream=body, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={"generated_text": "x", "details": None})

    return Client("http://flora.test", transport=httpx.MockTransport(handler), max_retries=0)


def test_unknown_keyword_is_a_type_error_before_any_request() -> None:
    seen: list[httpx.Request] = []
    client = recording_client(seen)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_token'"):
        client.generate("hi", max_token=5)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'top_n'"):
        client.generate_stream("hi", top_n=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'max_new_token'"):
        client.complete("hi", adapter_id="a", max_new_token=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'logprob'"):
        client.chat([{"role": "user", "content": "x"}], adapter_id="a", logprob=True)  # type: ignore[call-arg]
    assert seen == []
    client.generate("hi", max_new_tokens=3, top_n_tokens=2, truncate=8, ignore_eos_token=True)
    sent = json.loads(seen[-1].content)["parameters"]
    assert sent == {"max_new_tokens": 3, "top_n_tokens": 2, "truncate": 8, "ignore_eos_token": True}


def test_per_call_timeout_and_extra_headers() -> None:
    seen: list[httpx.Request] = []
    client = recording_client(seen)
    client.generate("hi", timeout=2.5, extra_headers={"X-Trace": "abc"})
    request = seen[-1]
    assert request.headers["x-trace"] == "abc"
    assert request.headers["user-agent"].startswith("flora-client/")  # defaults kept
    assert request.extensions["timeout"]["read"] == 2.5
    client.generate("hi")
    assert "x-trace" not in seen[-1].headers
    assert seen[-1].extensions["timeout"]["read"] == DEFAULT_TIMEOUT.read


# Every inference method with arguments that send one request (an adapter is named, so the
# OpenAI routes need no /v1/models look-up first).
INFERENCE_CALLS: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
    "generate": (("hi",), {}),
    "generate_stream": (("hi",), {}),
    "complete": (("hi", "a"), {}),
    "chat": (([{"role": "user", "content": "x"}], "a"), {}),
    "embed": (("x", "a"), {}),
    "classify": ((["x"], "a"), {"top_k": 1}),
}


def _inference_answer(request: httpx.Request) -> httpx.Response:
    """A minimal valid answer for any inference route (an empty SSE stream when asked)."""
    body = (
        json.loads(request.content)
        if request.headers.get("content-type") == "application/json"
        else {}
    )
    if request.url.path == "/generate_stream" or body.get("stream"):
        return httpx.Response(
            200, text="data: [DONE]\n\n", headers={"content-type": "text/event-stream"}
        )
    answers: dict[str, Any] = {
        "/generate": {"generated_text": "x"},
        "/v1/completions": {"choices": [{"text": "x"}]},
        "/v1/chat/completions": {"choices": [{"message": {"role": "assistant", "content": "x"}}]},
        "/v1/embeddings": {"data": [{"index": 0, "embedding": [1.0]}]},
        "/v1/classify": {"results": [[{"label": "pos", "score": 1.0, "index": 0}]]},
    }
    return httpx.Response(200, json=answers[request.url.path])


def test_inference_calls_cover_every_inference_method() -> None:
    # An inference method is one that takes an adapter; a new one must join the tests below.
    for cls in (Client, AsyncClient):
        methods = {
            name
            for name, fn in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_") and "adapter_id" in inspect.signature(fn).parameters
        }
        assert methods == set(INFERENCE_CALLS), cls.__name__


@pytest.mark.parametrize(
    ("method", "stream"),
    [(name, False) for name in sorted(INFERENCE_CALLS)] + [("complete", True), ("chat", True)],
)
def test_every_inference_method_sends_per_call_timeout_and_headers(
    method: str, stream: bool
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _inference_answer(request)

    args, kwargs = INFERENCE_CALLS[method]
    kwargs = {**kwargs, "stream": True} if stream else kwargs
    client = Client("http://flora.test", transport=httpx.MockTransport(handler), max_retries=0)
    result = getattr(client, method)(*args, timeout=2.5, extra_headers={"X-Trace": "abc"}, **kwargs)
    if hasattr(result, "close"):
        result.close()
    getattr(client, method)(*args, **kwargs)
    assert [r.method for r in seen] == ["POST", "POST"]
    assert seen[0].headers["x-trace"] == "abc"
    assert seen[0].headers["user-agent"].startswith("flora-client/")  # defaults kept
    assert seen[0].extensions["timeout"]["read"] == 2.5
    assert "x-trace" not in seen[1].headers
    assert seen[1].extensions["timeout"]["read"] == DEFAULT_TIMEOUT.read


@pytest.mark.parametrize("method", sorted(INFERENCE_CALLS))
def test_every_async_inference_method_sends_per_call_timeout_and_headers(method: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _inference_answer(request)

    args, kwargs = INFERENCE_CALLS[method]

    async def main() -> None:
        transport = httpx.MockTransport(handler)
        async with AsyncClient("http://flora.test", transport=transport, max_retries=0) as client:
            result = await getattr(client, method)(
                *args, timeout=2.5, extra_headers={"X-Trace": "abc"}, **kwargs
            )
            if hasattr(result, "aclose"):
                await result.aclose()
            await getattr(client, method)(*args, **kwargs)

    asyncio.run(main())
    assert len(seen) == 2
    assert seen[0].headers["x-trace"] == "abc"
    assert seen[0].extensions["timeout"]["read"] == 2.5
    assert "x-trace" not in seen[1].headers
    assert seen[1].extensions["timeout"]["read"] == DEFAULT_TIMEOUT.read


def test_cli_timeout_default_outlasts_the_servers_request_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flora_server.settings import Settings

    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"object": "list", "data": []})

    class RecordingClient(Client):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, transport=httpx.MockTransport(handler), **kwargs)

    monkeypatch.setattr(cli, "Client", RecordingClient)
    server_default = Settings.model_fields["request_timeout"].default
    runner = CliRunner()
    assert runner.invoke(app, ["models"]).exit_code == 0
    assert seen[-1].extensions["timeout"]["read"] == 315.0 == server_default + 15.0
    assert runner.invoke(app, ["--timeout", "7", "models"]).exit_code == 0
    assert seen[-1].extensions["timeout"]["read"] == 7.0
    assert cli.GlobalOptions().timeout == 315.0
    help_text = runner.invoke(app, ["--help"], env={"COLUMNS": "400"}).output
    assert "[default: 315.0]" in help_text


def test_default_read_timeout_outlasts_the_servers_request_timeout() -> None:
    from flora_server.settings import Settings

    assert Settings.model_fields["request_timeout"].default == SERVER_REQUEST_TIMEOUT
    assert DEFAULT_TIMEOUT.read > SERVER_REQUEST_TIMEOUT
    assert DEFAULT_TIMEOUT.connect <= 5.0


def test_stream_closes_early_as_a_context_manager() -> None:
    body = CountingStream(_events(50))
    client = recording_client([], body)
    with client.generate_stream("hi") as stream:
        first = next(stream)
        assert first.token.text == "t0"
    assert body.closed and body.sent < 50
    assert list(stream) == []  # nothing more after close
    body = CountingStream(_events(3))
    stream = recording_client([], body).generate_stream("hi")
    assert [e.token.text for e in stream] == ["t0", "t1", "t2"]
    assert body.closed


def test_async_stream_aclose() -> None:
    class AsyncBody(httpx.AsyncByteStream):
        closed = False

        async def __aiter__(self):
            for chunk in _events(50):
                yield chunk

        async def aclose(self) -> None:
            AsyncBody.closed = True

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, stream=AsyncBody(), headers={"content-type": "text/event-stream"}
        )

    async def main() -> str:
        client = AsyncClient("http://flora.test", transport=httpx.MockTransport(handler))
        async with await client.generate_stream("hi", max_new_tokens=50) as stream:
            event = await anext(stream)
        with pytest.raises(TypeError):
            await client.generate("hi", maxnewtokens=1)  # type: ignore[call-arg]
        await client.aclose()
        return event.token.text

    assert asyncio.run(main()) == "t0"
    assert AsyncBody.closed


def test_cli_temperature_zero_is_greedy(stub, stub_url) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app, ["generate", "x y", "--json", "--temperature", "0", "--url", stub_url]
    )
    assert result.exit_code == 0, result.output
    params = stub.last_json["parameters"]
    assert params["do_sample"] is False and "temperature" not in params


def test_flat_tgi_errors_become_typed_errors() -> None:
    from flora_client import NotFound, ValidationError

    answers = {
        404: {"error": "adapter 'x' not found", "error_type": "not_found_error"},
        422: {
            "error": "parameters.top_p: must be <= 1",
            "error_type": "validation",
            "param": "parameters.top_p",
        },
    }
    status = iter([404, 422])

    def handler(request: httpx.Request) -> httpx.Response:
        code = next(status)
        return httpx.Response(code, json=answers[code])

    client = Client("http://flora.test", transport=httpx.MockTransport(handler), max_retries=0)
    with pytest.raises(NotFound) as missing:
        client.generate("hi", adapter_id="x")
    assert missing.value.error_type == "not_found_error" and "'x'" in str(missing.value)
    with pytest.raises(ValidationError) as invalid:
        client.generate("hi", top_p=2.0)
    assert invalid.value.field == "parameters.top_p" and invalid.value.error_type == "validation"
