"""Adapter management: `/v1/adapters` (admin key when keys are configured).

Uploads are parsed from the request stream as it arrives (not by FastAPI's form parsing,
which reads the whole body first): each file part goes to a temp file with its sha256
computed on the way, and the body is capped at `max_upload_bytes` while streaming, so an
oversized upload is refused with 413 before it is all read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from python_multipart.multipart import MultipartParser, parse_options_header

from flora_server import auth
from flora_server.adapters.peft_upload import as_flora_upload
from flora_server.adapters.registry import (
    AdapterConflictError,
    AdapterRegistry,
    AdapterValidationError,
    BaseNotLoadedError,
    PutResult,
    StagedUpload,
    UploadDigestError,
)
from flora_server.adapters.staging import StagingBudget, StagingFullError
from flora_server.adapters.store import DigestMismatchError, StoredAdapter
from flora_server.api.deps import MaybeEngineDep, RegistryDep, SettingsDep, adapter_change
from flora_server.api.deps import require_admin_key as _auth
from flora_server.api.forms import FormFields, media_type
from flora_server.engine.protocol import (
    AdapterNotFoundError,
    AdapterOfOtherBaseError,
    GenerationEngine,
)
from flora_server.errors import APIError, invalid_field
from flora_server.ids import ADAPTER_ID_PATTERN, ADAPTER_ID_RULE, is_valid_adapter_id
from flora_server.schemas.adapters import (
    AdapterDeleted,
    AdapterDetail,
    AdapterInfo,
    AdapterList,
    AdapterUploadResponse,
)
from flora_server.schemas.common import ERROR_RESPONSES, UPLOAD_ERROR_RESPONSES

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

router = APIRouter(
    prefix="/v1/adapters",
    tags=["adapters"],
    dependencies=[Depends(_auth), Depends(adapter_change)],
    responses=ERROR_RESPONSES,
)

_TEXT_FIELDS = ("adapter_id", "sha256")
_FILE_FIELDS = ("config", "weights", "archive")
_FORM = FormFields(text=_TEXT_FIELDS, files=_FILE_FIELDS)
_MAX_TEXT_FIELD = 1024

_UPLOAD_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["adapter_id"],
                    "properties": {
                        "adapter_id": {
                            "type": "string",
                            "pattern": ADAPTER_ID_PATTERN,
                        },
                        "sha256": {
                            "type": "string",
                            "description": "hex digest of archive (or weights)",
                        },
                        "config": {
                            "type": "string",
                            "format": "binary",
                            "description": "adapter_config.json (FLoRA, or PEFT LoRA)",
                        },
                        "weights": {
                            "type": "string",
                            "format": "binary",
                            "description": "adapter.safetensors (or PEFT's "
                            "adapter_model.safetensors)",
                        },
                        "archive": {
                            "type": "string",
                            "format": "binary",
                            "description": "single-file form",
                        },
                    },
                }
            }
        },
    }
}


@dataclass
class _Part:
    name: str
    sink: IO[bytes] | None = None  # file parts
    path: Path | None = None
    digest: Any = None
    text: bytearray = field(default_factory=bytearray)


class _StreamingForm:
    """Callbacks for python-multipart that stage file parts in `registry.staging_dir`."""

    def __init__(self, registry: AdapterRegistry, stack: contextlib.ExitStack) -> None:
        self.registry = registry
        self.stack = stack
        self.parts: dict[str, _Part] = {}
        self._current: _Part | None = None
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self.error: APIError | None = None

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self._headers = {}
        self._current = None

    def _header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        # Parts are routed by name (a file part sent without a filename is still its bytes).
        error = _FORM.part_error(name, self.parts, is_file=None)
        if error is not None:
            raise _Abort(error)
        part = _Part(name)
        if name in _FILE_FIELDS:
            part.path = self.stack.enter_context(self.registry.staging_file(name))
            part.sink = self.stack.enter_context(part.path.open("wb"))
            part.digest = hashlib.sha256()
        self.parts[name] = part
        self._current = part

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._current
        if part is None:
            return
        chunk = data[start:end]
        if part.sink is not None:
            part.sink.write(chunk)
            part.digest.update(chunk)
        else:
            part.text.extend(chunk)
            if len(part.text) > _MAX_TEXT_FIELD:
                raise _Abort(invalid_field(part.name, "too long"))

    def _end(self) -> None:
        if self._current is not None and self._current.sink is not None:
            self._current.sink.flush()
        self._current = None

    def text(self, name: str) -> str | None:
        part = self.parts.get(name)
        return None if part is None else part.text.decode("utf-8", "replace").strip()

    def file(self, name: str) -> tuple[Path | None, str | None]:
        part = self.parts.get(name)
        if part is None or part.path is None:
            return None, None
        return part.path, part.digest.hexdigest()


class _Abort(Exception):
    def __init__(self, error: APIError) -> None:
        super().__init__(error.message)
        self.error = error


async def _read_form(
    request: Request, registry: AdapterRegistry, limit: int, stack: contextlib.ExitStack
) -> _StreamingForm:
    content_type, options = media_type(request.headers.get("content-type"))
    if content_type != "multipart/form-data" or b"boundary" not in options:
        raise APIError(415, "send multipart/form-data (adapter_id + config + weights, or archive)")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"upload of {declared} bytes exceeds the limit of {limit} bytes")
    # Settings keep the staging space >= max_upload_bytes: a lone upload always fits.
    budget: StagingBudget = request.app.state.staging_budget
    hold = budget.hold()
    stack.callback(hold.release)  # after the staged files (entered later) are removed
    form = _StreamingForm(registry, stack)
    parser = MultipartParser(options[b"boundary"], form.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise APIError(413, f"upload exceeds the limit of {limit} bytes")
            try:
                hold.add(len(chunk))
            except StagingFullError as exc:
                raise APIError(
                    507, str(exc), type="insufficient_storage", headers={"Retry-After": "5"}
                ) from None
            # File writes happen in the callbacks: keep them off the event loop.
            await asyncio.to_thread(parser.write, chunk)
        parser.finalize()
    except _Abort as exc:
        raise exc.error from None
    except ValueError as exc:  # python-multipart's malformed-body errors
        raise APIError(400, f"malformed multipart body: {exc}") from None
    return form


def _location(engine: GenerationEngine | None, adapter_id: str) -> tuple[str, int, int]:
    """(where the adapter is on this replica, running requests, waiting requests)."""
    if engine is None:
        return "stored", 0, 0
    stats = engine.stats()
    running = stats.running_adapters.count(adapter_id)
    waiting = stats.waiting_adapters.count(adapter_id)
    if adapter_id in stats.loaded_adapters or running:
        return "device", running, waiting
    if adapter_id in stats.host_adapters:
        return "host", running, waiting
    return "stored", running, waiting


def _info(
    stored: StoredAdapter, registry: AdapterRegistry, engine: GenerationEngine | None
) -> dict[str, Any]:
    location, running, waiting = _location(engine, stored.id)
    return {
        "id": stored.id,
        "sha256": stored.sha256,
        "size_bytes": stored.size_bytes,
        "created": int(stored.modified),
        "location": location,
        "running_requests": running,
        "waiting_requests": waiting,
        "request_count": registry.request_count(stored.id),
    }


def _check_id(adapter_id: str) -> None:
    if not is_valid_adapter_id(adapter_id):
        raise invalid_field("adapter_id", ADAPTER_ID_RULE)


def base_loading() -> APIError:
    """The 503 of an adapter route while the base model loads: which stored adapters are
    this server's is known from its base's fingerprint."""
    return APIError(
        503,
        "the base model is still loading; adapters are listed once it is known",
        headers={"Retry-After": "5"},
    )


def _check_visible(adapter_id: str) -> None:
    """Another tenant's adapter is answered exactly like a missing one."""
    if not auth.visible(adapter_id):
        raise APIError(404, f"adapter {adapter_id!r} not found", param="adapter_id")


@router.post(
    "",
    status_code=201,
    response_model=AdapterUploadResponse,
    summary="Upload an adapter (validated against the loaded base before it is stored)",
    openapi_extra=_UPLOAD_SCHEMA,
    responses={
        200: {"model": AdapterUploadResponse, "description": "unchanged or replaced"},
        **UPLOAD_ERROR_RESPONSES,
    },
)
async def upload_adapter(
    request: Request,
    response: Response,
    registry: RegistryDep,
    settings: SettingsDep,
    engine: MaybeEngineDep,
    overwrite: Annotated[
        bool, Query(description="replace an adapter with different bytes")
    ] = False,
) -> AdapterUploadResponse:
    if not registry.can_validate:
        raise APIError(
            503,
            "the base model is still loading; uploads are validated against it",
            headers={"Retry-After": "5"},
        )
    with contextlib.ExitStack() as stack:
        form = await _read_form(request, registry, settings.max_upload_bytes, stack)
        adapter_id = form.text("adapter_id")
        if not adapter_id:
            raise invalid_field("adapter_id", "field required")
        _check_id(adapter_id)
        tenant = auth.current_principal().tenant
        if not auth.visible(adapter_id):
            raise APIError(
                403, f"adapter ids of tenant {tenant!r} start with '{tenant}.'", param="adapter_id"
            )
        archive, archive_sha = form.file("archive")
        config, _ = form.file("config")
        weights, weights_sha = form.file("weights")
        if archive is not None and (config is not None or weights is not None):
            raise invalid_field("archive", "send either archive or config + weights, not both")
        if archive is None and (config is None or weights is None):
            missing = "config" if config is None else "weights"
            raise invalid_field(missing, "field required (or send a single `archive` file)")
        expected = form.text("sha256") or None
        upload = StagedUpload(archive, archive_sha, config, weights, weights_sha)
        staging = stack.enter_context(registry.staging_file("peft"))
        try:
            # A PEFT LoRA (config with `peft_type`) is converted exactly to FLoRA first.
            upload, expected = await asyncio.to_thread(as_flora_upload, upload, expected, staging)
            put = functools.partial(
                registry.put, adapter_id, upload, overwrite=overwrite, expected_sha256=expected
            )
            # Unbounded: the transfer's length depends on the upload (its wait for a store
            # worker is still bounded, and each S3 read by the client's read timeout).
            result: PutResult = await registry.call(put, bounded=False)
        except AdapterValidationError as exc:
            raise APIError(
                422,
                f"invalid adapter: {exc}",
                type="invalid_adapter",
                param="archive" if archive is not None else "weights",
            ) from None
        except UploadDigestError as exc:
            raise APIError(400, str(exc), param="sha256") from None
        except AdapterConflictError as exc:
            raise APIError(409, str(exc), param="adapter_id") from None
        except AdapterOfOtherBaseError as exc:
            raise APIError(409, f"{exc}; choose another id", param="adapter_id") from None
    if result.status != "unchanged" and engine is not None:
        # Before answering: a request admitted after this answer runs on the new bytes.
        # `created` too: a delete + re-create must not find the failed lookups or copies
        # cached since the delete.
        engine.invalidate_adapter(adapter_id)
    response.status_code = 201 if result.status == "created" else 200
    return AdapterUploadResponse(**_info(result.stored, registry, engine), status=result.status)


@router.get("", response_model=AdapterList, summary="List adapters (paged)")
async def list_adapters(
    registry: RegistryDep,
    engine: MaybeEngineDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(description="the last id of the previous page")] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> AdapterList:
    try:
        ids = [i for i in await registry.call(registry.list_ids) if auth.visible(i)]
    except BaseNotLoadedError:
        raise base_loading() from None
    total = len(ids)
    if after is not None:
        ids = [i for i in ids if i > after]
    page_ids = ids[offset : offset + limit]
    has_more = len(ids) > offset + limit

    def stat_all() -> list[StoredAdapter]:
        out = []
        for adapter_id in page_ids:
            with contextlib.suppress(AdapterNotFoundError):  # deleted meanwhile
                out.append(registry.stat(adapter_id))
        return out

    stored = await registry.call(stat_all)
    data = [AdapterInfo(**_info(s, registry, engine)) for s in stored]
    return AdapterList(
        data=data,
        total=total,
        has_more=has_more,
        next_after=page_ids[-1] if has_more and page_ids else None,
    )


@router.get("/{adapter_id:path}", response_model=AdapterDetail, summary="One adapter")
async def get_adapter(
    adapter_id: str, registry: RegistryDep, engine: MaybeEngineDep
) -> AdapterDetail:
    _check_id(adapter_id)
    _check_visible(adapter_id)

    def read() -> tuple[StoredAdapter, dict[str, Any]]:
        return registry.stat(adapter_id), registry.config(adapter_id)

    try:
        stored, config = await registry.call(read)
    except AdapterNotFoundError as exc:  # or another base's: the message names that base
        raise APIError(404, str(exc), param="adapter_id") from None
    except BaseNotLoadedError:
        raise base_loading() from None
    except (AdapterValidationError, DigestMismatchError) as exc:
        raise APIError(
            500, f"stored adapter is unreadable: {exc}", type="adapter_load_error"
        ) from None
    return AdapterDetail(
        **_info(stored, registry, engine), config=config, load_count=registry.load_count(adapter_id)
    )


@router.delete("/{adapter_id:path}", response_model=AdapterDeleted, summary="Delete an adapter")
async def delete_adapter(
    adapter_id: str, registry: RegistryDep, engine: MaybeEngineDep
) -> AdapterDeleted:
    _check_id(adapter_id)
    _check_visible(adapter_id)
    try:
        existed = await registry.call(registry.delete, adapter_id)
    except AdapterOfOtherBaseError as exc:  # never deleted through a server of another base
        raise APIError(404, str(exc), param="adapter_id") from None
    except BaseNotLoadedError:
        raise base_loading() from None
    if not existed:
        raise APIError(404, f"adapter {adapter_id!r} not found", param="adapter_id")
    if engine is not None:
        # Running requests keep their loaded copy and finish; later ones get 404.
        engine.invalidate_adapter(adapter_id)
    return AdapterDeleted(id=adapter_id)
