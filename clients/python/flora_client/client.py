"""The synchronous client. `AsyncClient` in async_client.py mirrors it method for method."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import Any, Literal, Unpack, overload

import httpx

from flora_client import _core
from flora_client._core import Call, ImageInput, ProgressCallback, transport_error
from flora_client.errors import (
    APIError,
    FloraConnectionError,
    FloraTimeoutError,
    NotReady,
    error_from_response,
)
from flora_client.params import ChatParams, CompletionParams, GenerateParams, check
from flora_client.retry import RetryPolicy
from flora_client.streams import Stream
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

__all__ = ["Adapters", "Client", "transport_error"]


class Adapters:
    """``client.adapters``: upload, list, get and delete adapters (admin key when keys are set)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def upload(
        self,
        path_or_archive: str | os.PathLike[str],
        adapter_id: str,
        *,
        overwrite: bool = False,
        progress: ProgressCallback | None = None,
    ) -> AdapterUploadResult:
        """Upload an adapter directory (adapter_config.json + adapter.safetensors) or a
        single-file ``*.flora`` adapter under ``adapter_id``.

        ``status`` in the result is ``created``, ``unchanged`` (the same bytes were already
        stored) or ``replaced``. Raises Conflict (409) when other bytes are stored under this
        id and ``overwrite`` is False.
        ``progress(sent_bytes, total_bytes)`` is called as the files are read. Not retried.
        """
        with _core.adapter_upload_call(
            path_or_archive, adapter_id, overwrite=overwrite, progress=progress
        ) as call:
            response = self._client._send(call)
        return _core.upload_result(response)

    def list(
        self, *, limit: int | None = None, offset: int | None = None, after: str | None = None
    ) -> AdapterList:
        """One page of stored adapters, in id order (``after``: the last id already seen)."""
        call = _core.adapters_list_call(limit, offset, after)
        return AdapterList.model_validate(self._client._send(call).json())

    def iter(self, page_size: int = 100) -> Iterator[AdapterInfo]:
        """Every stored adapter, page by page (keyset paging on ``after``)."""
        after: str | None = None
        while True:
            page = self.list(limit=page_size, after=after)
            yield from page.data
            after = _core.next_page_after(page, page_size)
            if after is None:
                return

    def get(self, adapter_id: str) -> AdapterInfo:
        """One adapter's description; NotFound when it does not exist."""
        call = Call("GET", f"/v1/adapters/{adapter_id}", _core.RetryKind.IDEMPOTENT)
        return AdapterInfo.model_validate(self._client._send(call).json())

    def delete(self, adapter_id: str) -> None:
        """Delete an adapter from the store and every cache; NotFound when it does not exist."""
        self._client._send(Call("DELETE", f"/v1/adapters/{adapter_id}", _core.RetryKind.IDEMPOTENT))


class Client:
    """A flora-serve client.

    ``base_url`` defaults to ``$FLORA_URL`` or http://127.0.0.1:8000, ``api_key`` to
    ``$FLORA_API_KEY``. ``timeout`` is seconds (or an ``httpx.Timeout``). Retries follow
    ``retry`` (see flora_client.retry): GETs and DELETEs on 429/503/connection errors,
    inference POSTs only on 429/503/refused connections, uploads never.
    ``base_model`` names the base for OpenAI routes when no adapter is given; by default it
    is read once from /v1/models.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int = 3,
        retry: RetryPolicy | None = None,
        base_model: str | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = _core.resolve_base_url(base_url)
        self.retry = retry or RetryPolicy(max_retries=max_retries)
        self._base_model = base_model
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=_core.default_headers(_core.resolve_api_key(api_key)),
            timeout=_core.as_timeout(timeout),
            transport=transport,
        )
        self.adapters = Adapters(self)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing --------------------------------------------------------------------

    def _send(self, call: Call, *, stream: bool = False) -> httpx.Response:
        """Send with retries; return a 2xx/3xx response or raise a FloraError."""
        attempt = 0
        while True:
            request = _core.build_request(self._http, call)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = _core.transport_retry_delay(self.retry, call.kind, exc, attempt)
                if delay is None:
                    raise transport_error(exc, self.base_url) from exc
                self._sleep(delay)
                attempt += 1
                continue
            if response.status_code < 400:
                return response
            if stream:
                response.read()
                response.close()
            error = error_from_response(response)
            delay = _core.status_retry_delay(
                self.retry, call.kind, response.status_code, error, attempt
            )
            if delay is None:
                raise error
            self._sleep(delay)
            attempt += 1

    def _stream(self, call: Call) -> Generator[dict[str, Any], None, None]:
        """Send now (so HTTP errors raise here), then iterate the SSE events lazily."""
        response = self._send(call, stream=True)
        return self._events(response)

    def _events(self, response: httpx.Response) -> Generator[dict[str, Any], None, None]:
        decoder = _core.SSEDecoder()
        try:
            for line in response.iter_lines():
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
            raise transport_error(exc, self.base_url) from exc
        finally:
            response.close()

    def _model(self, adapter_id: str | None) -> str:
        if adapter_id is not None:
            return adapter_id
        if self._base_model is None:
            self._base_model = _core.base_model_name(self.models())
        return self._base_model

    # --- inference ---------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        adapter_id: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        extra_headers: Mapping[str, str] | None = None,
        **params: Unpack[GenerateParams],
    ) -> GenerateResponse:
        """``POST /generate``. ``params``: see `GenerateParams` (an unknown name is a
        TypeError). ``timeout`` and ``extra_headers`` apply to this call only."""
        checked = check("generate", params, GenerateParams)
        call = _core.generate_call(prompt, adapter_id, checked, stream=False)
        call = _core.with_options(call, timeout, extra_headers)
        return GenerateResponse.model_validate(self._send(call).json())

    def generate_stream(
        self,
        prompt: str,
        adapter_id: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        extra_headers: Mapping[str, str] | None = None,
        **params: Unpack[GenerateParams],
    ) -> Stream[StreamResponse]:
        """``POST /generate_stream``: one StreamResponse per token; the last also carries
        ``generated_text`` and ``details``. Use it in ``with`` (or call ``close()``) to stop
        early."""
        checked = check("generate_stream", params, GenerateParams)
        call = _core.generate_call(prompt, adapter_id, checked, stream=True)
        call = _core.with_options(call, timeout, extra_headers)
        return Stream(self._stream(call), StreamResponse.model_validate)

    @overload
    def complete(
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
    def complete(
        self,
        prompt: str,
        adapter_id: str | None = ...,
        *,
        stream: Literal[True],
        timeout: float | httpx.Timeout | None = ...,
        extra_headers: Mapping[str, str] | None = ...,
        **params: Unpack[CompletionParams],
    ) -> Stream[Completion]: ...
    def complete(
        self,
        prompt: str,
        adapter_id: str | None = None,
        stream: bool = False,
        *,
        timeout: float | httpx.Timeout | None = None,
        extra_headers: Mapping[str, str] | None = None,
        **params: Unpack[CompletionParams],
    ) -> Completion | Stream[Completion]:
        """``POST /v1/completions`` with ``model`` = the adapter (or the base). ``params``:
        see `CompletionParams` (OpenAI names; max_new_tokens works too)."""
        checked = check("complete", params, CompletionParams)
        call = _core.completion_call(self._model(adapter_id), prompt, checked, stream=stream)
        call = _core.with_options(call, timeout, extra_headers)
        if stream:
            return Stream(self._stream(call), Completion.model_validate)
        return Completion.model_validate(self._send(call).json())

    @overload
    def chat(
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
    def chat(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        adapter_id: str | None = ...,
        *,
        stream: Literal[True],
        timeout: float | httpx.Timeout | None = ...,
        extra_headers: Mapping[str, str] | None = ...,
        **params: Unpack[ChatParams],
    ) -> Stream[ChatCompletionChunk]: ...
    def chat(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        adapter_id: str | None = None,
        stream: bool = False,
        *,
        timeout: float | httpx.Timeout | None = None,
        extra_headers: Mapping[str, str] | None = None,
        **params: Unpack[ChatParams],
    ) -> ChatCompletion | Stream[ChatCompletionChunk]:
        """``POST /v1/chat/completions``; ``messages`` are ChatMessage or {"role", "content"};
        ``params``: see `ChatParams`."""
        checked = check("chat", params, ChatParams)
        call = _core.chat_call(self._model(adapter_id), messages, checked, stream=stream)
        call = _core.with_options(call, timeout, extra_headers)
        if stream:
            return Stream(self._stream(call), ChatCompletionChunk.model_validate)
        return ChatCompletion.model_validate(self._send(call).json())

    def embed(
        self,
        texts: str | Sequence[str],
        adapter_id: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> EmbeddingResponse:
        """``POST /v1/embeddings``; ``.vectors`` on the result lists them in input order."""
        call = _core.embed_call(self._model(adapter_id), texts)
        call = _core.with_options(call, timeout, extra_headers)
        return EmbeddingResponse.model_validate(self._send(call).json())

    def classify(
        self,
        images_or_texts: str | ImageInput | Sequence[str | ImageInput],
        adapter_id: str | None = None,
        top_k: int = 5,
        *,
        timeout: float | httpx.Timeout | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> ClassifyResponse:
        """``POST /v1/classify``: ``Path``/bytes/binary files are images (sent as multipart),
        ``str`` values are texts (sent as JSON). ``results[i]`` is the top-k of input i."""
        call = _core.classify_call(images_or_texts, adapter_id, top_k)
        call = _core.with_options(call, timeout, extra_headers)
        return ClassifyResponse.model_validate(self._send(call).json())

    def models(self) -> ModelList:
        """``GET /v1/models``: the base model and every adapter."""
        call = Call("GET", "/v1/models", _core.RetryKind.IDEMPOTENT)
        return ModelList.model_validate(self._send(call).json())

    # --- probes ------------------------------------------------------------------------

    def _probe(self, path: str) -> httpx.Response:
        # Probes are never retried: their answer is the point.
        try:
            return self._http.get(path)
        except httpx.TransportError as exc:
            raise transport_error(exc, self.base_url) from exc

    def health(self) -> bool:
        """True when ``GET /health`` answers 200 (the process is alive)."""
        return _core.health_result(self._probe("/health"))

    def ready(self) -> bool:
        """True when ``GET /ready`` answers 200, False on 503 (still loading or draining)."""
        return _core.ready_result(self._probe("/ready"))

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.5) -> float:
        """Poll /ready until it answers 200; return the seconds waited. Refused connections
        count as not ready (the server may be starting). Raises FloraTimeoutError."""
        start = time.monotonic()
        while True:
            try:
                if self.ready():
                    return time.monotonic() - start
            except (FloraConnectionError, FloraTimeoutError, NotReady):
                pass
            except APIError:
                raise
            self._sleep(_core.wait_ready_sleep(start, timeout, interval, self.base_url))

    def metrics(self) -> str:
        """``GET /metrics``: the Prometheus text exposition."""
        call = Call("GET", "/metrics", _core.RetryKind.IDEMPOTENT)
        return self._send(call).text
