"""The asyncio client: `Client` method for method, every call a coroutine.

Streaming calls send the request when awaited (so HTTP errors raise there) and return an
async iterator: ``async for event in await client.generate_stream("Hi"): ...``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, Unpack, overload

import httpx

from flora_client import _core
from flora_client._core import Call, ImageInput, ProgressCallback
from flora_client.errors import (
    APIError,
    FloraConnectionError,
    FloraTimeoutError,
    NotReady,
    error_from_response,
)
from flora_client.params import ChatParams, CompletionParams, GenerateParams, check
from flora_client.retry import RetryKind, RetryPolicy
from flora_client.streams import AsyncStream
from flora_client.types import (
    AdapterInfo,
    AdapterList,
    AdapterUploadResult,
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    ClassifyResponse,
    Completion,
    EmbeddingResponse,
    GenerateResponse,
    ModelList,
    StreamResponse,
)

__all__ = ["AsyncAdapters", "AsyncClient"]


class AsyncAdapters:
    """``client.adapters`` of an AsyncClient; see `flora_client.client.Adapters`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def upload(
        self,
        path_or_archive: str | os.PathLike[str],
        adapter_id: str,
        *,
        overwrite: bool = False,
        progress: ProgressCallback | None = None,
    ) -> AdapterUploadResult:
        """Upload an adapter directory or ``*.flora`` file; not retried."""
        with _core.adapter_upload_call(
            path_or_archive, adapter_id, overwrite=overwrite, progress=progress
        ) as call:
            response = await self._client._send(call)
        return _core.upload_result(response)

    async def list(
        self, *, limit: int | None = None, offset: int | None = None, after: str | None = None
    ) -> AdapterList:
        response = await self._client._send(_core.adapters_list_call(limit, offset, after))
        return AdapterList.model_validate(response.json())

    async def iter(self, page_size: int = 100) -> AsyncIterator[AdapterInfo]:
        """Every stored adapter, page by page: ``async for info in client.adapters.iter()``."""
        after: str | None = None
        while True:
            page = await self.list(limit=page_size, after=after)
            for info in page.data:
                yield info
            after = _core.next_page_after(page, page_size)
            if after is None:
                return

    async def get(self, adapter_id: str) -> AdapterInfo:
        response = await self._client._send(
            Call("GET", f"/v1/adapters/{adapter_id}", RetryKind.IDEMPOTENT)
        )
        return AdapterInfo.model_validate(response.json())

    async def delete(self, adapter_id: str) -> None:
        await self._client._send(Call("DELETE", f"/v1/adapters/{adapter_id}", RetryKind.IDEMPOTENT))


class AsyncClient:
    """Asyncio flora-serve client; same arguments and retry rules as `Client`."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int = 3,
        retry: RetryPolicy | None = None,
        base_model: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.base_url = _core.resolve_base_url(base_url)
        self.retry = retry or RetryPolicy(max_retries=max_retries)
        self._base_model = base_model
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=_core.default_headers(_core.resolve_api_key(api_key)),
            timeout=_core.as_timeout(timeout),
            transport=transport,
        )
        self.adapters = AsyncAdapters(self)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- plumbing --------------------------------------------------------------------

    async def _send(self, call: Call, *, stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            request = _core.build_request(self._http, call)
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = _core.transport_retry_delay(self.retry, call.kind, exc, attempt)
                if delay is None:
                    raise _core.transport_error(exc, self.base_url) from exc
                await self._sleep(delay)
                attempt += 1
                continue
            if response.status_code < 400:
                return response
            if stream:
                await response.aread()
                await response.aclose()
            error = error_from_response(response)
            delay = _core.status_retry_delay(
                self.retry, call.kind, response.status_code, error, attempt
            )
            if delay is None:
                raise error
            await self._sleep(delay)
            attempt += 1

    async def _stream(self, call: Call) -> AsyncGenerator[dict[str, Any], None]:
        response = await self._send(call, stream=True)
        return self._events(response)

    async def _events(self, response: httpx.Response) -> AsyncGenerator[dict[str, Any], None]:
        decoder = _core.SSEDecoder()
        try:
            async for line in response.aiter_lines():
                data = decoder.feed(line)
                if data is None:
                    continue
                event = _core.decode_event(data)
                if event is None:
                    return
                yield event
            data = decoder.flush()
            if data is not None:
                event = _core.decode_event(data)
                if event is not None:
                    yield event
        except httpx.TransportError as exc:
            raise _core.transport_error(exc, self.base_url) from exc
        finally:
            await response.aclose()

    async def _model(self, adapter_id: str | None) -> str:
        if adapter_id is not None:
            return adapter_id
        if self._base_model is None:
            self._base_model = _core.base_model_name(await self.models())
        return self._base_model

    # --- inference ---------------------------------------------------------------------

    async def generate(
        self,
        prompt: str,
        adapter_id: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        extra_headers: Mapping[str, str] | None = None,
        **params: Unpack[GenerateParams],
    ) -> GenerateResponse:
        checked = check("generate", params, GenerateParams)
        call = _core.generate_call(prompt, adapter_id, checked, stream=False)
        call = _core.with_options(call, timeout, extra_headers)
        return GenerateResponse.model_validate((await self._send(call)).json())

    async def generate_stream(
        self,
        prompt: str,
        adapter_id: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        extra_headers: Mapping[str, str] | None = None,
        **params: Unpack[GenerateParams],
    ) -> AsyncStream[StreamResponse]:
        checked = check("generate_stream", params, GenerateParams)
        call = _core.generate_call(prompt, adapter_id, checked, stream=True)
        call = _core.with_options(call, timeout, extra_headers)
        return AsyncStream(await self._stream(call), StreamResponse.model_validate)

    @overload
    async def complete(
        self,
        prompt: str,
        adapter_id: str | None = ...,
        stream: Literal[False] = ...,
        *,
        timeout: float | httpx.Timeout | None = ...,
        extra_headers: Mapping[str, str] | None = ...,
        **params: Unpack[CompletionParams],
    ) -> Completion: ...
    @overload
    async def complete(
        self,
        prompt: str,
        adapter_id: str | None = ...,
        *,
        stream: Literal[True],
        timeout: float | httpx.Timeout | None = ...,
        extra_headers: Mapping[str, str] | None = ...,
        **params: Unpack[CompletionParams],
    ) -> AsyncStream[Completion]: ...
    async def complete(
        self,
        prompt: str,
        adapter_id: str | None = None,
        stream: bool = False,
        *,
        timeout: float | httpx.Timeout | None = None,
        extra_headers: Mapping[str, str] | None = None,
        **params: Unpack[CompletionParams],
    ) -> Completion | AsyncStream[Completion]:
        checked = check("complete", params, CompletionParams)
        model = await self._model(adapter_id)
        call = _core.completion_call(model, prompt, checked, stream=stream)
        call = _core.with_options(call, timeout, extra_headers)
        if stream:
            return AsyncStream(await self._stream(call), Completion.model_validate)
        return Completion.model_validate((await self._send(call)).json())

    @overload
    async def chat(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        adapter_id: str | None = ...,
        stream: Literal[False] = ...,
        *,
        timeout: float | httpx.Timeout | None = ...,
        extra_headers: Mapping[str, str] | None = ...,
        **params: Unpack[ChatParams],
    ) -> ChatCompletion: ...
    @overload
    async def chat(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        adapter_id: str | None = ...,
        *,
        stream: Literal[True],
        timeout: float | httpx.Timeout | None = ...,
        extra_headers: Mapping[str, str] | None = ...,
        **params: Unpack[ChatParams],
    ) -> AsyncStream[ChatCompletionChunk]: ...
    async def chat(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        adapter_id: str | None = None,
        stream: bool = False,
        *,
        timeout: float | httpx.Timeout | None = None,
        extra_headers: Mapping[str, str] | None = None,
        **params: Unpack[ChatParams],
    ) -> ChatCompletion | AsyncStream[ChatCompletionChunk]:
        checked = check("chat", params, ChatParams)
        model = await self._model(adapter_id)
        call = _core.chat_call(model, messages, checked, stream=stream)
        call = _core.with_options(call, timeout, extra_headers)
        if stream:
            return AsyncStream(await self._stream(call), ChatCompletionChunk.model_validate)
        return ChatCompletion.model_validate((await self._send(call)).json())

    async def embed(
        self,
        texts: str | Sequence[str],
        adapter_id: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> EmbeddingResponse:
        call = _core.embed_call(await self._model(adapter_id), texts)
        call = _core.with_options(call, timeout, extra_headers)
        return EmbeddingResponse.model_validate((await self._send(call)).json())

    async def classify(
        self,
        images_or_texts: str | ImageInput | Sequence[str | ImageInput],
        adapter_id: str | None = None,
        top_k: int = 5,
        *,
        timeout: float | httpx.Timeout | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> ClassifyResponse:
        call = _core.classify_call(images_or_texts, adapter_id, top_k)
        call = _core.with_options(call, timeout, extra_headers)
        return ClassifyResponse.model_validate((await self._send(call)).json())

    async def models(self) -> ModelList:
        response = await self._send(Call("GET", "/v1/models", RetryKind.IDEMPOTENT))
        return ModelList.model_validate(response.json())

    # --- probes ------------------------------------------------------------------------

    async def _probe(self, path: str) -> httpx.Response:
        try:
            return await self._http.get(path)
        except httpx.TransportError as exc:
            raise _core.transport_error(exc, self.base_url) from exc

    async def health(self) -> bool:
        return _core.health_result(await self._probe("/health"))

    async def ready(self) -> bool:
        return _core.ready_result(await self._probe("/ready"))

    async def wait_ready(self, timeout: float = 60.0, interval: float = 0.5) -> float:
        start = time.monotonic()
        while True:
            try:
                if await self.ready():
                    return time.monotonic() - start
            except (FloraConnectionError, FloraTimeoutError, NotReady):
                pass
            except APIError:
                raise
            await self._sleep(_core.wait_ready_sleep(start, timeout, interval, self.base_url))

    async def metrics(self) -> str:
        return (await self._send(Call("GET", "/metrics", RetryKind.IDEMPOTENT))).text
