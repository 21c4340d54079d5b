"""TGI/LoRAX shape: `POST /generate` and `POST /generate_stream` (SSE)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from flora_server.api import engine_requests, structured, tgi_errors
from flora_server.api.deps import EngineDep, MetricsDep, RegistryDep, SettingsDep
from flora_server.api.deps import require_inference_key as _auth
from flora_server.api.lorax_adapters import resolve_adapter
from flora_server.engine.protocol import FinishEvent, FinishReason, TokenEvent
from flora_server.errors import invalid_field
from flora_server.schemas.generate import (
    TGI_ERROR_RESPONSES,
    AlternativeToken,
    Details,
    FinishReasonTGI,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    InputToken,
    StreamDetails,
    StreamResponse,
    Token,
)

logger = logging.getLogger(__name__)
router = APIRouter(tags=["generate"], dependencies=[Depends(_auth)], responses=TGI_ERROR_RESPONSES)

_TGI_REASON: dict[FinishReason, FinishReasonTGI] = {
    "length": "length",
    "eos": "eos_token",
    "stop": "stop_sequence",
    "cancelled": "length",
    "deadline": "length",
}


def _decoding(p: GenerateParameters) -> engine_requests.Decoding:
    for name, unsupported, why in (
        ("best_of", p.best_of is not None and p.best_of > 1, "only best_of=1"),
        ("typical_p", p.typical_p is not None, "typical decoding is not implemented"),
        ("watermark", p.watermark, "watermarking is not implemented"),
        ("frequency_penalty", p.frequency_penalty is not None, "use repetition_penalty"),
    ):
        if unsupported:
            raise invalid_field(f"parameters.{name}", f"is not supported ({why})")
    # As in TGI, setting a sampling warper turns sampling on.
    warped = (
        (p.temperature is not None and p.temperature != 1.0)
        or p.top_k is not None
        or (p.top_p is not None and p.top_p < 1.0)
    )
    return engine_requests.Decoding(
        max_new_tokens=p.max_new_tokens,
        do_sample=p.do_sample or warped,
        temperature=p.temperature if p.temperature is not None else 1.0,
        top_k=p.top_k,
        top_p=p.top_p,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
        seed=p.seed,
        stop=p.stop,
        logprobs=True,  # TGI's Token.logprob is a number in every answer
        top_logprobs=max(p.top_n_tokens or 0, p.return_k_alternatives or 0),
        prompt_logprobs=p.decoder_input_details,
        ignore_eos=p.ignore_eos_token,
    )


async def _prepare(
    body: GenerateRequest, engine: EngineDep, settings: SettingsDep, registry: RegistryDep
) -> engine_requests.GenerationRequest:
    p = body.parameters
    decoding = _decoding(p)
    adapter_id = await resolve_adapter(p, registry, settings)
    prompt_ids = await engine.tokenize(body.inputs)
    if p.truncate is not None:
        prompt_ids = prompt_ids[-p.truncate :]  # TGI keeps the last `truncate` tokens
    request = engine_requests.build_request(
        prompt_ids=prompt_ids,
        adapter_id=adapter_id,
        decoding=decoding,
        settings=settings,
        context_length=engine.context_length,
        names=engine_requests.FieldNames(),
        request_id=engine_requests.new_request_id("gen"),
    )
    if p.response_format is not None and p.grammar is not None:
        raise invalid_field("parameters.grammar", "give response_format or grammar, not both")
    spec = structured.from_lorax(p.response_format) or structured.from_tgi(p.grammar)
    param = "parameters.grammar" if p.grammar is not None else "parameters.response_format"
    await structured.attach(engine, request, spec, param)
    return request


def _token(event: TokenEvent, p: GenerateParameters) -> Token:
    """TGI's `Token`: the token's own text (EOS: ""), not the text released with it (held
    back while it could start a stop sequence), so the non-special tokens' texts
    concatenate to `generated_text` as in TGI (plus, when a stop sequence ended the
    request, the rest of the token that completed it: `generated_text` ends before it)."""
    k = p.return_k_alternatives
    alternatives = None
    if k:
        alternatives = [
            AlternativeToken(id=t.token_id, text=t.text, logprob=_number(t.logprob))
            for t in event.top_logprobs[:k]
        ]
    return Token(
        id=event.token_id,
        text=event.token_text,
        logprob=_number(event.logprob),
        special=event.special,
        alternative_tokens=alternatives,
    )


def _top_tokens(event: TokenEvent, p: GenerateParameters) -> list[Token] | None:
    """TGI's top_tokens for one position: the `top_n_tokens` most likely, best first."""
    if not p.top_n_tokens:
        return None
    top = event.top_logprobs[: p.top_n_tokens]
    return [Token(id=t.token_id, text=t.text, logprob=_number(t.logprob)) for t in top]


def _number(logprob: float | None) -> float:
    # The engine reports a logprob for every token of these routes (logprobs=True).
    return 0.0 if logprob is None else logprob


@router.post("/generate", response_model=GenerateResponse, summary="Generate text (TGI shape)")
async def generate(
    http: Request,
    response: Response,
    body: GenerateRequest,
    engine: EngineDep,
    settings: SettingsDep,
    registry: RegistryDep,
    metrics: MetricsDep,
) -> GenerateResponse:
    request = await _prepare(body, engine, settings, registry)
    out = await engine_requests.collect(engine, request, metrics, http.receive)
    assert out.finish is not None
    p = body.parameters
    text = out.finish.generated_text
    if p.return_full_text:
        text = body.inputs + text
    prefill = [
        InputToken(id=t.token_id, text=t.text, logprob=t.logprob)
        for t in out.finish.prompt_logprobs
    ]
    details = Details(
        finish_reason=_TGI_REASON[out.finish.reason],
        generated_tokens=out.finish.generated_tokens,
        prompt_tokens=out.finish.prompt_tokens,
        seed=request.params.seed,
        adapter_id=request.adapter_id,
        prefill=prefill,
        tokens=[_token(t, p) for t in out.tokens],
        top_tokens=[_top_tokens(t, p) or [] for t in out.tokens] if p.top_n_tokens else None,
        adapter_sha256=out.finish.adapter_sha256,
    )
    response.headers.update(engine_requests.adapter_headers(out.finish.adapter_sha256))
    return GenerateResponse(generated_text=text, details=details)


@router.post(
    "/generate_stream",
    summary="Generate text as server-sent events (TGI shape)",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "one event per token"}},
)
async def generate_stream(
    http: Request,
    body: GenerateRequest,
    engine: EngineDep,
    settings: SettingsDep,
    registry: RegistryDep,
    metrics: MetricsDep,
) -> StreamingResponse:
    request = await _prepare(body, engine, settings, registry)
    first, stream = await engine_requests.open_stream(engine, request, metrics, http.receive)
    p = body.parameters
    prefix = body.inputs if p.return_full_text else ""

    def event_for(
        token: TokenEvent,
        index: int,
        generated_text: str | None = None,
        details: StreamDetails | None = None,
    ) -> bytes:
        response = StreamResponse(
            index=index,
            token=_token(token, p),
            top_tokens=_top_tokens(token, p),
            generated_text=generated_text,
            details=details,
        )
        return engine_requests.sse(response.model_dump(mode="json"))

    async def body_events() -> AsyncIterator[bytes]:
        # TGI puts the last token in the final event together with generated_text and
        # details, so each token is held until the next event says whether it was last.
        # A request that ends before its first token (cancelled while queued) has no token
        # to carry the final event: TGI's types require one, so it ends without one.
        held: TokenEvent | None = None
        index = 0
        event = first
        try:
            while True:
                if isinstance(event, FinishEvent):
                    if held is None:
                        return
                    details = StreamDetails(
                        finish_reason=_TGI_REASON[event.reason],
                        generated_tokens=event.generated_tokens,
                        prompt_tokens=event.prompt_tokens,
                        input_length=event.prompt_tokens,
                        seed=request.params.seed,
                        adapter_id=request.adapter_id,
                        adapter_sha256=event.adapter_sha256,
                    )
                    yield event_for(
                        held, index, generated_text=prefix + event.generated_text, details=details
                    )
                    return
                if held is not None:
                    yield event_for(held, index)
                    index += 1
                held = event
                event = await anext(stream)
        except StopAsyncIteration:
            yield tgi_errors.sse_error(RuntimeError("stream ended without a finish event"))
        except Exception as exc:
            logger.warning("stream %s failed: %s", request.request_id, exc)
            if held is not None:  # generated before the failure: the client gets it first
                yield event_for(held, index)
            yield tgi_errors.sse_error(exc)
        finally:
            await stream.aclose()

    headers = engine_requests.adapter_headers(first.adapter_sha256)
    return StreamingResponse(body_events(), media_type="text/event-stream", headers=headers)
