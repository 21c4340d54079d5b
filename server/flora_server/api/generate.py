"""TGI/LoRAX shape: `POST /generate` and `POST /generate_stream` (SSE)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from flora_server.api import sampling, structured
from flora_server.api.deps import EngineDep, MetricsDep, RegistryDep, SettingsDep
from flora_server.api.deps import require_inference_key as _auth
from flora_server.api.lorax_adapters import resolve_adapter
from flora_server.engine.protocol import FinishEvent, FinishReason, TokenEvent
from flora_server.errors import invalid_field
from flora_server.schemas.common import ERROR_RESPONSES
from flora_server.schemas.generate import (
    Details,
    FinishReasonTGI,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    StreamDetails,
    StreamResponse,
    Token,
)

logger = logging.getLogger(__name__)
router = APIRouter(tags=["generate"], dependencies=[Depends(_auth)], responses=ERROR_RESPONSES)

_TGI_REASON: dict[FinishReason, FinishReasonTGI] = {
    "length": "length",
    "eos": "eos_token",
    "stop": "stop_sequence",
    "cancelled": "cancelled",
    "deadline": "deadline",
}


def _decoding(p: GenerateParameters) -> sampling.Decoding:
    for name, unsupported in (
        ("best_of", p.best_of is not None and p.best_of > 1),
        ("top_n_tokens", bool(p.top_n_tokens)),
        ("typical_p", p.typical_p is not None),
        ("watermark", p.watermark),
        ("decoder_input_details", p.decoder_input_details),
    ):
        if unsupported:
            raise invalid_field(f"parameters.{name}", "is not supported by this server")
    # As in TGI, setting a sampling warper turns sampling on.
    warped = (
        (p.temperature is not None and p.temperature != 1.0)
        or p.top_k is not None
        or (p.top_p is not None and p.top_p < 1.0)
    )
    return sampling.Decoding(
        max_new_tokens=p.max_new_tokens,
        do_sample=p.do_sample or warped,
        temperature=p.temperature if p.temperature is not None else 1.0,
        top_k=p.top_k,
        top_p=p.top_p,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
        seed=p.seed,
        stop=p.stop,
        logprobs=p.details,
    )


async def _prepare(
    body: GenerateRequest, engine: EngineDep, settings: SettingsDep, registry: RegistryDep
) -> sampling.GenerationRequest:
    p = body.parameters
    decoding = _decoding(p)
    adapter_id = await resolve_adapter(p, registry, settings)
    prompt_ids = await engine.tokenize(body.inputs)
    request = sampling.build_request(
        prompt_ids=prompt_ids,
        adapter_id=adapter_id,
        decoding=decoding,
        settings=settings,
        context_length=engine.context_length,
        names=sampling.FieldNames(),
        request_id=sampling.new_request_id("gen"),
    )
    if p.response_format is not None and p.grammar is not None:
        raise invalid_field("parameters.grammar", "give response_format or grammar, not both")
    spec = structured.from_lorax(p.response_format) or structured.from_tgi(p.grammar)
    param = "parameters.grammar" if p.grammar is not None else "parameters.response_format"
    await structured.attach(engine, request, spec, param)
    return request


def _token(event: TokenEvent) -> Token:
    return Token(id=event.token_id, text=event.text, logprob=event.logprob, special=False)


@router.post("/generate", response_model=GenerateResponse, summary="Generate text (TGI shape)")
async def generate(
    http: Request,
    body: GenerateRequest,
    engine: EngineDep,
    settings: SettingsDep,
    registry: RegistryDep,
    metrics: MetricsDep,
) -> GenerateResponse:
    request = await _prepare(body, engine, settings, registry)
    out = await sampling.collect(engine, request, metrics, http.receive)
    assert out.finish is not None
    text = out.finish.generated_text
    if body.parameters.return_full_text:
        text = body.inputs + text
    details = Details(
        finish_reason=_TGI_REASON[out.finish.reason],
        generated_tokens=out.finish.generated_tokens,
        prompt_tokens=out.finish.prompt_tokens,
        seed=request.params.seed,
        adapter_id=request.adapter_id,
        tokens=[_token(t) for t in out.tokens] if body.parameters.details else None,
    )
    return GenerateResponse(generated_text=text, details=details)


@router.post(
    "/generate_stream",
    summary="Generate text as server-sent events (TGI shape)",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "one event per token"}},
)
async def generate_stream(
    body: GenerateRequest,
    engine: EngineDep,
    settings: SettingsDep,
    registry: RegistryDep,
    metrics: MetricsDep,
) -> StreamingResponse:
    request = await _prepare(body, engine, settings, registry)
    first, stream = await sampling.open_stream(engine, request, metrics)
    prefix = body.inputs if body.parameters.return_full_text else ""

    async def body_events() -> AsyncIterator[bytes]:
        # TGI puts the last token in the final event together with generated_text and
        # details, so each token is held until the next event says whether it was last.
        held: TokenEvent | None = None
        event = first
        try:
            while True:
                if isinstance(event, FinishEvent):
                    final = StreamResponse(
                        token=_token(held) if held is not None else None,
                        generated_text=prefix + event.generated_text,
                        details=StreamDetails(
                            finish_reason=_TGI_REASON[event.reason],
                            generated_tokens=event.generated_tokens,
                            prompt_tokens=event.prompt_tokens,
                            seed=request.params.seed,
                            adapter_id=request.adapter_id,
                        ),
                    )
                    yield sampling.sse(final.model_dump(mode="json"))
                    return
                if held is not None:
                    yield sampling.sse(StreamResponse(token=_token(held)).model_dump(mode="json"))
                held = event
                event = await anext(stream)
        except StopAsyncIteration:
            yield sampling.sse_error(RuntimeError("stream ended without a finish event"))
        except Exception as exc:
            logger.warning("stream %s failed: %s", request.request_id, exc)
            yield sampling.sse_error(exc)
        finally:
            await stream.aclose()

    return StreamingResponse(body_events(), media_type="text/event-stream")
