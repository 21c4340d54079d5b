"""`POST /v1/classify`: top-k labels per image (image classifiers) or per text (text encoders
with an adapter that has a classification head).

Images come as multipart files (`files`, plus form fields `adapter_id`, `top_k`; any other
part, a repeated `adapter_id` / `top_k`, or a part of the wrong kind is a 422) or as JSON
`{"inputs": [base64...], "adapter_id", "top_k"}`; both are checked by the same model with
the same messages. Decoding and its limits run in a thread (`flora_server.images`); the
engine preprocesses (the adapter decides the image size; `VisionEngine.serve` does it in a
thread too when it knows that size) and runs the forward.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from flora_server.api.deps import BatchEngineDep, MetricsDep, RegistryDep, SettingsDep
from flora_server.api.deps import require_inference_key as _auth
from flora_server.api.engine_requests import adapter_headers, check_adapter
from flora_server.api.forms import FormFields, media_type
from flora_server.engine.batch_engine import BatchEngine
from flora_server.engine.encoder import EncoderOptions
from flora_server.errors import APIError, invalid_field
from flora_server.images import ImageRejected, decode_base64, decode_image
from flora_server.metrics import RequestTimer
from flora_server.schemas.classify import ClassifyRequest, ClassifyResponse, LabelScore
from flora_server.schemas.common import ERROR_RESPONSES
from flora_server.settings import Settings, is_valid_adapter_id

router = APIRouter(
    prefix="/v1", tags=["classify"], dependencies=[Depends(_auth)], responses=ERROR_RESPONSES
)

_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": ClassifyRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "adapter_id": {"type": "string"},
                        "top_k": {"type": "integer", "minimum": 1},
                    },
                    "required": ["files"],
                }
            },
        },
    }
}


_FORM = FormFields(text=("adapter_id", "top_k"), files=("files",), repeatable=("files",))


def _validated(parse: Callable[[], ClassifyRequest]) -> ClassifyRequest:
    """`parse()`, its first validation error as a 422 naming the field (JSON and multipart
    bodies answer alike)."""
    try:
        return parse()
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise APIError(422, f"{param}: {first.get('msg', 'invalid')}", param=param) from None


def _json_body(raw: bytes) -> ClassifyRequest:
    return _validated(lambda: ClassifyRequest.model_validate_json(raw))


async def _multipart(request: Request, settings: Settings) -> tuple[ClassifyRequest, list[bytes]]:
    limit = settings.max_inputs_per_request
    try:
        form = await request.form(max_files=limit + 1, max_fields=8)
    except Exception as exc:  # starlette's MultiPartException and malformed bodies
        raise APIError(422, f"malformed multipart body: {exc}", param="files") from None
    seen: set[str] = set()
    for name, value in form.multi_items():
        error = _FORM.part_error(name, seen, is_file=isinstance(value, UploadFile))
        if error is not None:
            raise error
        seen.add(name)
    files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
    if not files:
        raise invalid_field("files", "send one or more image files in the form field 'files'")
    if len(files) > limit:
        raise invalid_field("files", f"at most {limit} images per request")
    blobs = []
    for f in files:
        data = await f.read(settings.max_image_bytes + 1)
        if len(data) > settings.max_image_bytes:
            raise APIError(413, f"{f.filename}: larger than {settings.max_image_bytes} bytes")
        blobs.append(data)
    # Text values by now (part_error); an empty one is the field left out, as in curl -F x=.
    fields = {name: form[name] for name in ("adapter_id", "top_k") if form.get(name)}
    body = _validated(
        lambda: ClassifyRequest.model_validate({"inputs": ["-"] * len(blobs), **fields})
    )
    return body, blobs


def _decode_all(blobs: list[bytes], settings: Settings) -> list[Any]:
    return [
        decode_image(
            data,
            max_pixels=settings.max_image_pixels,
            max_bytes=settings.max_image_bytes,
            name=f"image {i}",
        )
        for i, data in enumerate(blobs)
    ]


def _adapter(body: ClassifyRequest, engine: BatchEngine) -> str | None:
    adapter_id = body.adapter_id
    if adapter_id is None or adapter_id == engine.model_name:
        return None
    if not is_valid_adapter_id(adapter_id):
        raise invalid_field("adapter_id", "not a valid adapter id")
    return adapter_id


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    summary="Top-k labels per image (or per text for encoder adapters with a head)",
    openapi_extra=_BODY_DOC,
    responses={413: {"description": "an image is too large"}, 415: {"description": "format"}},
)
async def classify(
    request: Request,
    response: Response,
    engine: BatchEngineDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    registry: RegistryDep,
) -> ClassifyResponse:
    content_type, _ = media_type(request.headers.get("content-type"))
    images = engine.kind == "image-classifier"
    if content_type == "multipart/form-data":
        if not images:
            raise APIError(415, "a text encoder classifies JSON texts, not uploaded files")
        body, blobs = await _multipart(request, settings)
    elif content_type in ("application/json", ""):
        body = _json_body(await request.body())
        if len(body.inputs) > settings.max_inputs_per_request:
            raise invalid_field("inputs", f"at most {settings.max_inputs_per_request} per request")
        blobs = []
        if images:
            try:
                blobs = [
                    decode_base64(text, max_bytes=settings.max_image_bytes, name=f"inputs[{i}]")
                    for i, text in enumerate(body.inputs)
                ]
            except ImageRejected as exc:
                raise APIError(exc.status, exc.message, param="inputs") from None
    else:
        raise APIError(415, "send application/json or multipart/form-data")
    adapter_id = _adapter(body, engine)
    # Unknown and other tenants' adapters: 404 before decoding or the engine.
    await check_adapter(registry, adapter_id, "adapter_id")
    timer = RequestTimer(metrics, adapter_id)
    if images:
        try:
            inputs = await asyncio.to_thread(_decode_all, blobs, settings)
        except ImageRejected as exc:
            raise APIError(exc.status, exc.message, param="inputs") from None
        options: Any = body.top_k
    else:
        inputs, options = list(body.inputs), EncoderOptions("classify", body.top_k)
    results, adapter_sha256 = await engine.serve(
        adapter_id, inputs, options, timeout=settings.request_timeout
    )
    response.headers.update(adapter_headers(adapter_sha256))
    timer.finish("stop", len(inputs), 0)
    return ClassifyResponse(
        model=engine.model_name,
        adapter_id=adapter_id,
        results=[
            [LabelScore(label=p.label, index=p.index, score=p.score) for p in row]
            for row in results
        ],
    )
