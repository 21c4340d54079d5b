"""Retry decisions and delays: against the stub (real 429s) and MockTransport."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from flora_stub_server import StubState

from flora_client import (
    Client,
    FloraConnectionError,
    FloraTimeoutError,
    NotReady,
    Overloaded,
    RetryPolicy,
    ServerError,
)


def test_delay_formula() -> None:
    policy = RetryPolicy(max_retries=5, base_delay=0.5, max_delay=3.0, jitter=0.1, rand=lambda: 1.0)
    # rand() == 1: backoff = min(max_delay, base * 2**n): 0.5, 1, 2, 3 (capped), 3.
    assert [policy.delay(n) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.delay(5) is None  # retries exhausted
    # Retry-After is a floor, plus jitter * retry_after: max(10, 0.5) + 1.0 * 0.1 * 10.
    assert policy.delay(0, retry_after=10.0) == pytest.approx(11.0)
    # A backoff longer than Retry-After wins: max(0.2, 2.0) + 0.02.
    assert policy.delay(2, retry_after=0.2) == pytest.approx(2.02)
    # Retry-After beyond max_retry_after: give up at once.
    assert RetryPolicy(max_retry_after=5.0).delay(0, retry_after=6.0) is None
    half = RetryPolicy(base_delay=1.0, rand=lambda: 0.5)
    assert half.delay(1) == pytest.approx(1.0)  # uniform draw 0.5 of the cap 2.0


def test_generate_retries_429_honouring_retry_after(
    stub: StubState, stub_url: str, no_jitter: RetryPolicy
) -> None:
    stub.fail_plan["POST /generate"] = [(429, "2"), (429, "1")]
    sleeps: list[float] = []
    with Client(stub_url, retry=no_jitter, sleep=sleeps.append) as client:
        result = client.generate("x y")
    assert result.generated_text == " y x"
    assert stub.attempts["POST /generate"] == 3
    assert sleeps == [2.0, 1.0]


def test_stream_retries_503_before_first_byte(
    stub: StubState, stub_url: str, no_jitter: RetryPolicy
) -> None:
    stub.fail_plan["POST /generate_stream"] = [(503, "1")]
    sleeps: list[float] = []
    with Client(stub_url, retry=no_jitter, sleep=sleeps.append) as client:
        text = "".join(
            e.token.text for e in client.generate_stream("a b") if e.token and not e.token.special
        )
    assert text == " b a"
    assert stub.attempts["POST /generate_stream"] == 2 and sleeps == [1.0]


def test_gives_up_after_max_retries(stub: StubState, stub_url: str) -> None:
    stub.fail_plan["GET /v1/adapters"] = [(429, "0.5")] * 5
    sleeps: list[float] = []
    policy = RetryPolicy(max_retries=2, rand=lambda: 0.0)
    with (
        Client(stub_url, retry=policy, sleep=sleeps.append) as client,
        pytest.raises(Overloaded) as info,
    ):
        client.adapters.list()
    assert stub.attempts["GET /v1/adapters"] == 3
    assert sleeps == [0.5, 0.5]
    assert info.value.retry_after == 0.5


def test_upload_is_never_retried(
    stub: StubState, stub_url: str, adapter_dir: Path, no_jitter: RetryPolicy
) -> None:
    stub.fail_plan["POST /v1/adapters"] = [(429, "1")]
    sleeps: list[float] = []
    with Client(stub_url, retry=no_jitter, sleep=sleeps.append) as client:
        with pytest.raises(Overloaded) as info:
            client.adapters.upload(adapter_dir, "a")
        assert info.value.retry_after == 1.0
        assert stub.attempts["POST /v1/adapters"] == 1 and sleeps == []
        assert client.adapters.list().total == 0


def test_delete_503_is_retried(
    stub: StubState, stub_url: str, adapter_dir: Path, no_jitter: RetryPolicy
) -> None:
    with Client(stub_url, retry=no_jitter, sleep=lambda s: None) as client:
        client.adapters.upload(adapter_dir, "a")
        stub.fail_plan["DELETE /v1/adapters/a"] = [(503, None)]
        client.adapters.delete("a")
        assert stub.attempts["DELETE /v1/adapters/a"] == 2
        assert client.adapters.list().total == 0


def test_inference_500_is_not_retried(
    stub: StubState, stub_url: str, no_jitter: RetryPolicy
) -> None:
    stub.fail_plan["POST /generate"] = [(500, None)]
    with (
        Client(stub_url, retry=no_jitter, sleep=lambda s: None) as client,
        pytest.raises(ServerError),
    ):
        client.generate("a")
    assert stub.attempts["POST /generate"] == 1


def test_retry_after_too_long_is_not_waited(stub: StubState, stub_url: str) -> None:
    stub.fail_plan["POST /generate"] = [(429, "3600")]
    sleeps: list[float] = []
    with Client(stub_url, sleep=sleeps.append) as client, pytest.raises(Overloaded):
        client.generate("a")
    assert stub.attempts["POST /generate"] == 1 and sleeps == []


class Flaky:
    """MockTransport handler that raises `exc` for the first `failures` calls."""

    def __init__(self, exc: type[httpx.TransportError], failures: int) -> None:
        self.exc, self.failures, self.calls = exc, failures, 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc("boom", request=request)
        if request.url.path == "/generate":
            return httpx.Response(200, json={"generated_text": "ok"})
        return httpx.Response(200, json={"data": [], "total": 0})


@pytest.mark.parametrize(
    ("exc", "method", "retried"),
    [
        (httpx.ConnectError, "generate", True),  # nothing was sent
        (httpx.ReadTimeout, "generate", False),  # the model may have run
        (httpx.RemoteProtocolError, "generate", False),
        (httpx.ConnectError, "list", True),
        (httpx.ReadTimeout, "list", True),  # GET: harmless to repeat
    ],
)
def test_transport_failures(exc: type[httpx.TransportError], method: str, retried: bool) -> None:
    handler = Flaky(exc, failures=1)
    policy = RetryPolicy(max_retries=2, rand=lambda: 0.0)
    with Client(
        "http://x", retry=policy, transport=httpx.MockTransport(handler), sleep=lambda s: None
    ) as client:
        call = (lambda: client.generate("p")) if method == "generate" else client.adapters.list
        if retried:
            call()
        else:
            with pytest.raises((FloraConnectionError, FloraTimeoutError)):
                call()
    assert handler.calls == (2 if retried else 1)


def test_wait_ready_polls_until_ready(stub: StubState, stub_url: str) -> None:
    stub.ready = False
    polls: list[float] = []

    def sleep(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 3:
            stub.ready = True

    with Client(stub_url, sleep=sleep) as client:
        client.wait_ready(timeout=30, interval=0.25)
    assert polls == [0.25, 0.25, 0.25]
    assert stub.attempts["GET /ready"] == 4


def test_wait_ready_times_out(stub: StubState, stub_url: str) -> None:
    stub.ready = False
    with (
        Client(stub_url) as client,
        pytest.raises(FloraTimeoutError, match=r"not ready after 0\.3 s"),
    ):
        client.wait_ready(timeout=0.3, interval=0.1)


def test_wait_ready_treats_refused_connection_as_not_ready() -> None:
    handler = Flaky(httpx.ConnectError, failures=2)

    def ready_after(request: httpx.Request) -> httpx.Response:
        handler(request)
        return httpx.Response(200, json={"status": "ready"})

    with Client(
        "http://x", transport=httpx.MockTransport(ready_after), sleep=lambda s: None
    ) as client:
        client.wait_ready(timeout=5)
    assert handler.calls == 3


def test_ready_raises_on_unexpected_status() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"error": {"type": "internal", "message": "boom"}})

    with Client("http://x", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ServerError):
            client.ready()
        with pytest.raises(ServerError):
            client.wait_ready(timeout=1)
    assert issubclass(NotReady, Exception)
