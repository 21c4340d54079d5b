"""What the sync and async clients share: settings resolution, request bodies, SSE decoding
and response parsing. Nothing here does I/O on the network, so both clients stay thin."""

from __future__ import annotations

import base64
import hashlib
import json
import mimetypes
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeGuard, cast

import httpx

from flora_client.errors import (
    FloraConnectionError,
    FloraError,
    FloraTimeoutError,
    StreamError,
    error_from_response,
)
from flora_client.retry import RetryKind, RetryPolicy
from flora_client.types import (
    AdapterList,
    AdapterUploadResult,
    ChatMessage,
    ModelList,
)

DEFAULT_URL = "http://127.0.0.1:8000"
# Read timeout: a little over the server's default FLORA_REQUEST_TIMEOUT (300 s, queueing
# plus generation), so a slow answer ends with the server's own 504, not a client timeout.
# Connecting should be quick. The `flora --timeout` default is the same read timeout.
SERVER_REQUEST_TIMEOUT = 300.0
DEFAULT_READ_TIMEOUT = SERVER_REQUEST_TIMEOUT + 15.0
DEFAULT_TIMEOUT = httpx.Timeout(DEFAULT_READ_TIMEOUT, connect=5.0)
ENV_URL = "FLORA_URL"
ENV_API_KEY = "FLORA_API_KEY"

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"

ProgressCallback = Callable[[int, int], None]
ImageInput = Path | bytes | bytearray | IO[bytes]


def resolve_base_url(url: str | None) -> str:
    """The argument, else ``$FLORA_URL``, else http://127.0.0.1:8000; no trailing slash."""
    chosen = url or os.environ.get(ENV_URL) or DEFAULT_URL
    return chosen.rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    """The argument, else ``$FLORA_API_KEY``, else None (no Authorization header)."""
    return api_key or os.environ.get(ENV_API_KEY) or None


def default_headers(api_key: str | None) -> dict[str, str]:
    from flora_client import __version__

    headers = {"User-Agent": f"flora-client/{__version__}", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def as_timeout(timeout: float | httpx.Timeout | None) -> httpx.Timeout:
    if timeout is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(float(timeout), connect=min(float(timeout), 5.0))


@dataclass
class Call:
    """One HTTP call as the client methods describe it; the clients execute it."""

    method: str
    path: str
    kind: RetryKind
    json: Any = None
    params: dict[str, Any] | None = None
    data: dict[str, str] | None = None
    files: list[tuple[str, tuple[str, Any, str]]] | None = None
    timeout: float | httpx.Timeout | None = None  # None: the client's default
    headers: Mapping[str, str] | None = None  # added to the client's own headers


def with_options(
    call: Call, timeout: float | httpx.Timeout | None, extra_headers: Mapping[str, str] | None
) -> Call:
    """``call`` with a per-call timeout and extra headers (as the openai client names them)."""
    call.timeout = timeout
    call.headers = dict(extra_headers) if extra_headers else None
    return call


def drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def build_request(http: httpx.Client | httpx.AsyncClient, call: Call) -> httpx.Request:
    """The httpx request for ``call``; built afresh for every attempt (a body is single-use)."""
    options: dict[str, Any] = {}
    if call.timeout is not None:
        options["timeout"] = as_timeout(call.timeout)
    if call.headers:
        options["headers"] = call.headers
    return http.build_request(
        call.method,
        call.path,
        json=call.json,
        params=call.params,
        data=call.data,
        files=call.files,
        **options,
    )


# --- errors and retries ------------------------------------------------------------------


def transport_error(exc: httpx.TransportError, base_url: str) -> FloraError:
    """A FloraError for an httpx transport failure, naming the server."""
    if isinstance(exc, httpx.TimeoutException):
        return FloraTimeoutError(f"timed out talking to {base_url}: {type(exc).__name__}")
    return FloraConnectionError(f"cannot reach {base_url}: {exc or type(exc).__name__}")


def connect_failed(exc: httpx.TransportError) -> bool:
    """True when no byte of the request reached the server."""
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


def transport_retry_delay(
    retry: RetryPolicy, kind: RetryKind, exc: httpx.TransportError, attempt: int
) -> float | None:
    """Seconds to wait before retrying after a transport failure, or None to raise it."""
    if retry.retries_transport(kind, connect_failed=connect_failed(exc)):
        return retry.delay(attempt)
    return None


def status_retry_delay(
    retry: RetryPolicy, kind: RetryKind, status: int, error: FloraError, attempt: int
) -> float | None:
    """Seconds to wait before retrying an error answer, or None to raise ``error``; the
    server's Retry-After (on the error) is a floor."""
    if retry.retries_status(kind, status):
        return retry.delay(attempt, getattr(error, "retry_after", None))
    return None


# --- answers that need no model class ----------------------------------------------------


def health_result(response: httpx.Response) -> bool:
    """``GET /health``: 200 is alive, 503 is not; any other error status raises."""
    if response.status_code >= 400 and response.status_code != 503:
        raise error_from_response(response)
    return response.status_code == 200


def ready_result(response: httpx.Response) -> bool:
    """``GET /ready``: 503 is not ready (loading or draining); any other error raises."""
    if response.status_code == 503:
        return False
    if response.status_code >= 400:
        raise error_from_response(response)
    return True


def wait_ready_sleep(start: float, timeout: float, interval: float, base_url: str) -> float:
    """Seconds to sleep before polling /ready again (``start`` from time.monotonic());
    FloraTimeoutError once ``timeout`` seconds have passed."""
    elapsed = time.monotonic() - start
    if elapsed >= timeout:
        raise FloraTimeoutError(f"{base_url} not ready after {timeout:g} s")
    return min(interval, max(0.0, timeout - elapsed))


def adapters_list_call(limit: int | None, offset: int | None, after: str | None) -> Call:
    params = drop_none({"limit": limit, "offset": offset, "after": after})
    return Call("GET", "/v1/adapters", RetryKind.IDEMPOTENT, params=params)


def next_page_after(page: AdapterList, page_size: int) -> str | None:
    """The ``after`` for the page following ``page``; None when it was the last."""
    if not page.data or page.has_more is False or len(page.data) < page_size:
        return None
    return page.next_after or page.data[-1].id


# --- request bodies ----------------------------------------------------------------------


def generate_call(
    prompt: str, adapter_id: str | None, params: Mapping[str, Any], *, stream: bool
) -> Call:
    parameters = drop_none({**params, "adapter_id": adapter_id})
    if isinstance(parameters.get("stop"), str):
        parameters["stop"] = [parameters["stop"]]
    path = "/generate_stream" if stream else "/generate"
    return Call(
        "POST", path, RetryKind.REJECTED_ONLY, json={"inputs": prompt, "parameters": parameters}
    )


def _openai_params(params: Mapping[str, Any]) -> dict[str, Any]:
    # One vocabulary across the client: max_new_tokens is accepted for OpenAI routes too.
    out = drop_none(params)
    if "max_new_tokens" in out and "max_tokens" not in out:
        out["max_tokens"] = out.pop("max_new_tokens")
    return out


def completion_call(model: str, prompt: str, params: Mapping[str, Any], *, stream: bool) -> Call:
    body = {**_openai_params(params), "model": model, "prompt": prompt, "stream": stream}
    return Call("POST", "/v1/completions", RetryKind.REJECTED_ONLY, json=body)


def chat_call(
    model: str,
    messages: Sequence[ChatMessage | Mapping[str, Any]],
    params: Mapping[str, Any],
    *,
    stream: bool,
) -> Call:
    wire = [
        m.model_dump(exclude_none=True) if isinstance(m, ChatMessage) else dict(m) for m in messages
    ]
    body = {**_openai_params(params), "model": model, "messages": wire, "stream": stream}
    return Call("POST", "/v1/chat/completions", RetryKind.REJECTED_ONLY, json=body)


def embed_call(model: str, texts: str | Sequence[str]) -> Call:
    inputs = [texts] if isinstance(texts, str) else list(texts)
    body = {"model": model, "input": inputs, "encoding_format": "float"}
    return Call("POST", "/v1/embeddings", RetryKind.REJECTED_ONLY, json=body)


def _is_image(item: Any) -> TypeGuard[ImageInput]:
    return isinstance(item, Path | bytes | bytearray) or hasattr(item, "read")


def _image_part(i: int, item: ImageInput) -> tuple[str, bytes, str]:
    if isinstance(item, Path):
        content = item.read_bytes()
        name = item.name
    elif isinstance(item, bytes | bytearray):
        content, name = bytes(item), f"image{i}"
    else:
        content = item.read()
        name = Path(getattr(item, "name", f"image{i}")).name
    mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return name, content, mime


def classify_call(
    inputs: str | ImageInput | Sequence[str | ImageInput], adapter_id: str | None, top_k: int
) -> Call:
    """Images (``Path``, bytes, binary file objects) go as multipart ``files``; strings go
    as JSON texts. A ``str`` is always text: wrap a file name in ``Path`` to send the image."""
    if isinstance(inputs, str) or _is_image(inputs):
        items: list[str | ImageInput] = [inputs]
    else:  # a sequence of inputs (TypeGuard narrows only the positive branch)
        items = list(cast(Sequence[str | ImageInput], inputs))
    if not items:
        raise ValueError("classify needs at least one input")
    pictures = [item for item in items if _is_image(item)]
    if len(pictures) == len(items):
        files = [("files", _image_part(i, item)) for i, item in enumerate(pictures)]
        data = drop_none({"adapter_id": adapter_id, "top_k": str(top_k)})
        return Call("POST", "/v1/classify", RetryKind.REJECTED_ONLY, data=data, files=files)
    if pictures:
        raise ValueError("classify takes either images (Path/bytes/file) or texts (str), not both")
    body = drop_none({"inputs": items, "adapter_id": adapter_id, "top_k": top_k})
    return Call("POST", "/v1/classify", RetryKind.REJECTED_ONLY, json=body)


def image_to_base64(data: bytes) -> str:
    """Helper for callers that build JSON classify bodies themselves."""
    return base64.b64encode(data).decode("ascii")


# --- model name for the OpenAI routes ----------------------------------------------------


def base_model_name(models: ModelList) -> str:
    """The base model in /v1/models: the entry without a parent (adapters name the base as
    their parent), else the first entry's parent, else the first id."""
    for model in models.data:
        if model.parent is None:
            return model.id
    if models.data:
        return models.data[0].parent or models.data[0].id
    raise ValueError("the server lists no models")


# --- adapter uploads ---------------------------------------------------------------------


class _CountingReader:
    """A binary file that reports how many bytes have been read, for upload progress.

    httpx seeks to 0 before streaming a part, so the count is the current position, not a
    running sum (a retried body would otherwise count twice)."""

    def __init__(self, raw: IO[bytes], on_read: Callable[[], None]) -> None:
        self._raw = raw
        self._on_read = on_read
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._raw.read(size)
        self.position += len(chunk)
        self._on_read()
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = self._raw.seek(offset, whence)
        return self.position

    def tell(self) -> int:
        return self._raw.tell()

    def fileno(self) -> int:
        return self._raw.fileno()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def upload_parts(path: Path) -> list[tuple[str, Path, str]]:
    """(form field, file, content type) for an adapter directory or a single-file adapter."""
    if path.is_dir():
        config, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
        missing = [p.name for p in (config, weights) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{path} is not an adapter directory: missing {', '.join(missing)}"
            )
        return [
            ("config", config, "application/json"),
            ("weights", weights, "application/octet-stream"),
        ]
    if path.is_file():
        return [("archive", path, "application/octet-stream")]
    raise FileNotFoundError(f"no such adapter directory or file: {path}")


@contextmanager
def adapter_upload_call(
    path: str | os.PathLike[str],
    adapter_id: str,
    *,
    overwrite: bool,
    progress: ProgressCallback | None,
) -> Iterator[Call]:
    """The multipart upload for ``path``; files stay open while the call runs.

    The form's ``sha256`` is the digest of the archive (single-file form) or of the weights
    file (directory form), as the server defines it, so a corrupted transfer is refused
    with 400 instead of being stored.
    """
    parts = upload_parts(Path(path))
    total = sum(p.stat().st_size for _, p, _ in parts)
    # parts[-1] is the archive or the weights: the file the server's digest check covers.
    data = {"adapter_id": adapter_id, "sha256": sha256_file(parts[-1][1])}
    readers: list[_CountingReader] = []

    def report() -> None:
        if progress is not None:
            progress(min(total, sum(r.position for r in readers)), total)

    with ExitStack() as stack:
        files = []
        for field, file_path, mime in parts:
            reader = _CountingReader(stack.enter_context(file_path.open("rb")), report)
            readers.append(reader)
            files.append((field, (file_path.name, reader, mime)))
        params = {"overwrite": "true"} if overwrite else None
        yield Call("POST", "/v1/adapters", RetryKind.NEVER, params=params, data=data, files=files)


def upload_result(response: httpx.Response) -> AdapterUploadResult:
    body = response.json()
    if "status" not in body:  # a server that says it only with the status code
        body["status"] = "created" if response.status_code == 201 else "unchanged"
    return AdapterUploadResult.model_validate(body)


# --- server-sent events ------------------------------------------------------------------


DONE = "[DONE]"


class SSEDecoder:
    """Incremental server-sent-events decoder over lines (without their newline).

    ``feed`` returns the event's data once a blank line ends it; multi-line ``data:`` fields
    join with newlines, comments (``:``) and other fields are ignored."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        if line == "":
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


def decode_event(data: str) -> dict[str, Any] | None:
    """The JSON of one event; None for ``[DONE]``. An in-stream error raises StreamError."""
    if data.strip() == DONE:
        return None
    payload = json.loads(data)
    error = payload.get("error") if isinstance(payload, dict) else None
    if error:
        if isinstance(error, dict):
            message, kind = str(error.get("message", error)), error.get("type")
        else:
            message, kind = str(error), payload.get("error_type")
        raise StreamError(message, status_code=200, error_type=kind, body=payload)
    return payload
