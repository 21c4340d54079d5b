"""OpenAI `POST /v1/embeddings` for text encoders; `model` names an adapter or the base."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Depends, Response

from flora_server.api.deps import BatchEngineDep, MetricsDep, RegistryDep, SettingsDep
from flora_server.api.deps import require_inference_key as _auth
from flora_server.api.engine_requests import adapter_headers, check_adapter
from flora_server.engine.encoder import EmbeddingResult, EncoderOptions
from flora_server.errors import invalid_field
from flora_server.metrics import RequestTimer
from flora_server.schemas.common import ERROR_RESPONSES
from flora_server.schemas.embeddings import (
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
)
from flora_server.settings import is_valid_adapter_id

router = APIRouter(
    prefix="/v1", tags=["openai"], dependencies=[Depends(_auth)], responses=ERROR_RESPONSES
)


def encode_base64(vector: np.ndarray) -> str:
    """OpenAI's base64 format: the little-endian float32 bytes of the vector."""
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")


@router.post("/embeddings", response_model=EmbeddingResponse, summary="Sentence embeddings")
async def embeddings(
    body: EmbeddingRequest,
    response: Response,
    engine: BatchEngineDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    registry: RegistryDep,
) -> EmbeddingResponse:
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts:
        raise invalid_field("input", "must not be empty")
    if len(texts) > settings.max_inputs_per_request:
        raise invalid_field("input", f"at most {settings.max_inputs_per_request} texts")
    adapter_id = None if body.model in (None, "", engine.model_name) else body.model
    if adapter_id is not None and not is_valid_adapter_id(adapter_id):
        raise invalid_field("model", "not a valid adapter id")
    # Unknown and other tenants' adapters: 404 before the engine (as the generation routes).
    await check_adapter(registry, adapter_id, "model")
    timer = RequestTimer(metrics, adapter_id)
    result: EmbeddingResult
    result, adapter_sha256 = await engine.serve(
        adapter_id, texts, EncoderOptions("embed"), timeout=settings.request_timeout
    )
    response.headers.update(adapter_headers(adapter_sha256))
    vectors = result.vectors.numpy()
    if body.dimensions is not None and body.dimensions != vectors.shape[1]:
        raise invalid_field("dimensions", f"this model's embeddings have {vectors.shape[1]}")
    timer.finish("stop", result.tokens, 0)
    data = [
        Embedding(
            index=i,
            embedding=encode_base64(v) if body.encoding_format == "base64" else v.tolist(),
        )
        for i, v in enumerate(vectors)
    ]
    usage = EmbeddingUsage(prompt_tokens=result.tokens, total_tokens=result.tokens)
    return EmbeddingResponse(data=data, model=body.model or engine.model_name, usage=usage)
