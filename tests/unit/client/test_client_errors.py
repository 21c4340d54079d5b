"""Status code -> exception mapping, Retry-After parsing (httpx.MockTransport, no server)."""

from __future__ import annotations

from email.utils import formatdate

import httpx
import pytest

from flora_client import (
    APIError,
    BadRequest,
    Client,
    Conflict,
    FloraConnectionError,
    FloraTimeoutError,
    Forbidden,
    NotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    ServerError,
    StreamError,
    Unauthorized,
    ValidationError,
)
from flora_client.errors import error_from_response, parse_retry_after


def answer(
    status: int, body: object = None, headers: dict[str, str] | None = None, text: str | None = None
) -> httpx.Response:
    request = httpx.Request("GET", "http://x/v1/adapters/a")
    if text is not None:
        return httpx.Response(status, text=text, headers=headers, request=request)
    return httpx.Response(status, json=body, headers=headers, request=request)


def flora_error(kind: str, message: str) -> dict[str, object]:
    return {"error": {"type": kind, "message": message}}


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequest),
        (401, Unauthorized),
        (403, Forbidden),
        (404, NotFound),
        (409, Conflict),
        (413, PayloadTooLarge),
        (422, ValidationError),
        (429, Overloaded),
        (503, NotReady),
        (500, ServerError),
        (502, ServerError),
        (418, APIError),
    ],
)
def test_each_status_maps_to_its_class(status: int, cls: type[APIError]) -> None:
    exc = error_from_response(answer(status, flora_error("some_type", "went wrong")))
    assert type(exc) is cls
    assert exc.status_code == status
    assert exc.error_type == "some_type"
    assert exc.message == "went wrong"
    assert str(exc) == f"{status} some_type: went wrong"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            flora_error("validation_error", "parameters.temperature: must be >= 0"),
            "parameters.temperature",
        ),
        (
            flora_error("validation_error", "body.parameters.top_p: must be <= 1"),
            "parameters.top_p",
        ),
        (flora_error("validation_error", "field 'max_tokens' is too large"), "max_tokens"),
        ({"error": {"type": "v", "message": "bad", "param": "n"}}, "n"),
        ({"error": {"type": "v", "message": "bad", "loc": ["body", "stop", 0]}}, "stop.0"),
        ({"detail": [{"loc": ["body", "inputs"], "msg": "Field required"}]}, "inputs"),
        (flora_error("validation_error", "bad input"), None),
    ],
)
def test_validation_error_field(body: object, field: str | None) -> None:
    exc = error_from_response(answer(422, body))
    assert isinstance(exc, ValidationError)
    assert exc.field == field


def test_fastapi_detail_message_is_used() -> None:
    exc = error_from_response(
        answer(422, {"detail": [{"loc": ["body", "inputs"], "msg": "Field required"}]})
    )
    assert exc.message == "Field required"


@pytest.mark.parametrize(
    ("header", "expected"), [("3", 3.0), ("0.5", 0.5), ("-2", 0.0), ("soon", None)]
)
def test_retry_after_on_429_and_503(header: str, expected: float | None) -> None:
    for status in (429, 503):
        exc = error_from_response(answer(status, flora_error("t", "m"), {"Retry-After": header}))
        assert isinstance(exc, Overloaded | NotReady)
        assert exc.retry_after == expected


def test_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30.0)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after(None) is None


def test_non_json_error_body() -> None:
    exc = error_from_response(answer(502, text="<html>Bad Gateway</html>"))
    assert isinstance(exc, ServerError)
    assert exc.message == "<html>Bad Gateway</html>"
    assert exc.body is None and exc.error_type is None


def test_client_raises_mapped_error_with_body() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(409, json=flora_error("conflict", "exists"))

    with (
        Client("http://x", transport=httpx.MockTransport(handler)) as client,
        pytest.raises(Conflict) as info,
    ):
        client.adapters.get("a")
    assert info.value.body == flora_error("conflict", "exists")


def test_transport_errors_become_flora_errors() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with Client("http://x", transport=httpx.MockTransport(refused), max_retries=0) as client:
        with pytest.raises(FloraConnectionError, match="cannot reach http://x"):
            client.generate("a")
        with pytest.raises(FloraConnectionError):
            client.health()
    with (
        Client("http://x", transport=httpx.MockTransport(slow), max_retries=0) as client,
        pytest.raises(FloraTimeoutError),
    ):
        client.generate("a")


def test_error_inside_stream_raises_stream_error() -> None:
    body = (
        b'data: {"token": {"id": 1, "text": "a", "logprob": null, "special": false}}\n\n'
        b'data: {"error": "engine crashed", "error_type": "generation"}\n\n'
    )

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    with Client("http://x", transport=httpx.MockTransport(handler)) as client:
        events = client.generate_stream("p")
        first = next(events)
        assert first.token is not None and first.token.text == "a"
        with pytest.raises(StreamError) as info:
            next(events)
    assert info.value.error_type == "generation" and info.value.message == "engine crashed"


def test_sse_multiline_data_and_missing_final_blank_line() -> None:
    body = b'data: {"token": {"id": 1,\ndata: "text": "x"}}\n\ndata: {"generated_text": "x"}'

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body)

    with Client("http://x", transport=httpx.MockTransport(handler)) as client:
        events = list(client.generate_stream("p"))
    assert events[0].token is not None and events[0].token.text == "x"
    assert events[1].generated_text == "x"
