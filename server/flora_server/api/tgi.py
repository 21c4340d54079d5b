"""TGI's own routes beside `/generate`: `POST /` (what TGI's, LoRAX's and `huggingface_hub`'s
clients call; `stream` picks SSE or one answer, as in TGI) and `GET /info`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from flora_server.api import generate
from flora_server.api.deps import EngineDep, MetricsDep, RegistryDep, SettingsDep
from flora_server.api.deps import require_inference_key as _auth
from flora_server.schemas.generate import (
    TGI_ERROR_RESPONSES,
    GenerateRequest,
    GenerateResponse,
    Info,
)

router = APIRouter(tags=["generate"], dependencies=[Depends(_auth)], responses=TGI_ERROR_RESPONSES)


@router.post(
    "/",
    response_model=list[GenerateResponse],
    summary="Generate text (TGI's compat route: a one-element list, or SSE with stream=true)",
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def compat_generate(
    http: Request,
    response: Response,
    body: GenerateRequest,
    engine: EngineDep,
    settings: SettingsDep,
    registry: RegistryDep,
    metrics: MetricsDep,
) -> Any:
    if body.stream:
        return await generate.generate_stream(http, body, engine, settings, registry, metrics)
    answer = await generate.generate(http, response, body, engine, settings, registry, metrics)
    return [answer]


@router.get("/info", response_model=Info, summary="Served model and limits (TGI's Info)")
async def info(http: Request, engine: EngineDep, settings: SettingsDep) -> Info:
    context = engine.context_length
    batch_tokens = context * settings.max_batch_size
    pool = engine.stats().kv_capacity_tokens  # engine v2: what the KV pool holds
    if pool:
        batch_tokens = min(batch_tokens, pool)
    dtype = settings.dtype
    if dtype == "auto":
        dtype = "bfloat16" if settings.device.startswith("cuda") else "float32"
    return Info(
        model_id=engine.model_name,
        model_dtype=f"torch.{dtype}",
        model_device_type=settings.device.split(":")[0],
        max_concurrent_requests=settings.max_queue + settings.max_batch_size,
        max_stop_sequences=settings.max_stop_sequences,
        max_input_length=context - 1,
        max_input_tokens=context - 1,
        max_total_tokens=context,
        max_batch_total_tokens=batch_tokens,
        max_batch_size=settings.max_batch_size,
        max_adapters=engine.max_slots,
        version=http.app.version,
    )
