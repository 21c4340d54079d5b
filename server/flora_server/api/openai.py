"""OpenAI shape: `/v1/completions`, `/v1/chat/completions` (with SSE streaming), `/v1/models`.

`model` names an adapter id, or the base model's name for no adapter.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from flora_server import auth
from flora_server.api import engine_requests, structured, tools
from flora_server.api import openai_conventions as conventions
from flora_server.api.deps import EngineDep, MetricsDep, RegistryDep, SettingsDep
from flora_server.api.deps import require_inference_key as _auth
from flora_server.engine.constraints import ConstraintSpec
from flora_server.engine.protocol import (
    FinishEvent,
    FinishReason,
    GenerationEngine,
    GenerationRequest,
    Logprob,
    TokenEvent,
)
from flora_server.errors import APIError, invalid_field
from flora_server.metrics import ServerMetrics
from flora_server.schemas.common import ERROR_RESPONSES
from flora_server.schemas.openai import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
)

logger = logging.getLogger(__name__)
router = APIRouter(
    prefix="/v1", tags=["openai"], dependencies=[Depends(_auth)], responses=ERROR_RESPONSES
)


def _reason(reason: FinishReason) -> str:
    return "length" if reason in ("length", "deadline") else "stop"


def _check_common(body: SamplingFields) -> None:
    if body.n != 1:
        raise invalid_field("n", "only n=1 is supported")
    if body.presence_penalty:
        raise invalid_field("presence_penalty", "is not supported (use repetition_penalty)")
    if body.frequency_penalty:
        raise invalid_field("frequency_penalty", "is not supported (use repetition_penalty)")
    if body.logit_bias:
        raise invalid_field("logit_bias", "is not supported")


def _decoding(
    body: SamplingFields, max_tokens: int | None, logprobs: bool
) -> engine_requests.Decoding:
    # OpenAI semantics: temperature defaults to 1 (sampling); 0 means greedy.
    temperature = 1.0 if body.temperature is None else body.temperature
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return engine_requests.Decoding(
        max_new_tokens=max_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_k=body.top_k,
        top_p=body.top_p,
        min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        seed=body.seed,
        stop=stop,
        logprobs=logprobs,
        ignore_eos=bool(body.ignore_eos),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        min_tokens=body.min_tokens or 0,
        allowed_token_ids=tuple(body.allowed_token_ids or ()),
    )


async def _request(
    *,
    body: SamplingFields,
    prompt_ids: list[int],
    decoding: engine_requests.Decoding,
    engine: GenerationEngine,
    settings: SettingsDep,
    registry: RegistryDep,
    names: engine_requests.FieldNames,
    prefix: str,
    constraint: tuple[ConstraintSpec | None, str],
) -> GenerationRequest:
    """The engine request, its adapter checked and `constraint` (a spec and the field it
    came from) compiled onto it."""
    adapter_id = conventions.adapter_for(body.model, engine)
    try:
        await engine_requests.check_adapter(registry, adapter_id, "model")
        request = engine_requests.build_request(
            prompt_ids=prompt_ids,
            adapter_id=adapter_id,
            decoding=decoding,
            settings=settings,
            context_length=engine.context_length,
            names=names,
            request_id=engine_requests.new_request_id(prefix),
        )
    except APIError as exc:
        raise conventions.openai_error(exc, body.model) from None
    await structured.attach(engine, request, *constraint)
    return request


def _usage(finish: FinishEvent) -> Usage:
    return Usage(
        prompt_tokens=finish.prompt_tokens,
        completion_tokens=finish.generated_tokens,
        total_tokens=finish.prompt_tokens + finish.generated_tokens,
    )


def _envelope(request: GenerationRequest, object_: str, created: int, model: str) -> dict[str, Any]:
    """The fields every chunk of one stream repeats, ahead of its `choices`."""
    return {"id": request.request_id, "object": object_, "created": created, "model": model}


async def _stream(
    http: Request,
    body: SamplingFields,
    engine: GenerationEngine,
    request: GenerationRequest,
    metrics: ServerMetrics,
    envelope: dict[str, Any],
    chunk: Callable[[TokenEvent | None, FinishEvent | None], dict[str, Any] | None],
) -> StreamingResponse:
    """Start `request` (errors before the first event are a status code) and stream its
    chunks as SSE: the opening chunk if `chunk(None, None)` gives one, a chunk per token
    event that `chunk(event, None)` makes one of (every token with logprobs, else those
    releasing text), the finish chunk, a usage chunk when `stream_options.include_usage`,
    [DONE]. A failure after the first event (the request's own, or the server shutting
    down) is an error object followed by [DONE]."""
    first, stream = await engine_requests.open_stream(engine, request, metrics, http.receive)
    if first.adapter_sha256:  # flora extension, in every chunk as in the header
        envelope["adapter_sha256"] = first.adapter_sha256
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def events() -> AsyncIterator[bytes]:
        event = first
        try:
            opening = chunk(None, None)
            if opening is not None:
                yield engine_requests.sse(opening)
            while True:
                if isinstance(event, FinishEvent):
                    yield engine_requests.sse(chunk(None, event))
                    if include_usage:
                        usage = _usage(event).model_dump()
                        yield engine_requests.sse({**envelope, "choices": [], "usage": usage})
                    yield engine_requests.sse("[DONE]")
                    return
                data = chunk(event, None)
                if data is not None:
                    yield engine_requests.sse(data)
                event = await anext(stream)
        except Exception as exc:
            logger.warning("stream %s failed: %s", request.request_id, exc)
            # An error object, then [DONE] as after any stream, so that clients reading
            # up to [DONE] (vLLM's shape) stop there.
            yield engine_requests.sse_error(exc)
            yield engine_requests.sse("[DONE]")
        finally:
            await stream.aclose()

    headers = engine_requests.adapter_headers(first.adapter_sha256)
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _scored(token: TokenEvent) -> Logprob:
    """A generated token as logprobs report it: its own text, not the text released with it."""
    return Logprob(token.token_id, token.token_text, token.logprob, token.top_logprobs)


def _offsets(texts: list[str], start: int) -> list[int]:
    """`text_offset` of tokens whose texts follow each other from `start` in the text."""
    offsets = []
    for text in texts:
        offsets.append(start)
        start += len(text)
    return offsets


def _completion_logprobs(
    scored: list[Logprob], offsets: list[int], with_top: bool
) -> CompletionLogprobs:
    """The `logprobs` of a completion choice, or of one stream chunk's token: every token's
    own text, logprob, alternatives (with `logprobs` > 0) and offset in the text."""
    return CompletionLogprobs(
        tokens=[t.text for t in scored],
        token_logprobs=[t.logprob for t in scored],
        top_logprobs=[conventions.top_logprob(t.text, t.logprob, t.top) for t in scored]
        if with_top
        else None,
        text_offset=offsets,
    )


@router.post("/completions", response_model=CompletionResponse, summary="Text completion")
async def completions(
    http: Request,
    response: Response,
    body: CompletionRequest,
    engine: EngineDep,
    settings: SettingsDep,
    registry: RegistryDep,
    metrics: MetricsDep,
) -> Any:
    _check_common(body)
    if body.suffix:
        raise invalid_field("suffix", "is not supported")
    if body.best_of not in (None, 1):
        raise invalid_field("best_of", "only best_of=1 is supported")
    if body.echo and body.stream:
        raise invalid_field("echo", "is not supported with stream=true")
    if body.max_tokens == 0 and not body.echo:
        raise invalid_field("max_tokens", "0 is only meaningful with echo=true")
    prompt_ids, prompt_text = await conventions.completion_prompt(body, engine)
    want_logprobs = body.logprobs is not None
    # max_tokens=0 with echo scores the prompt only: one token runs and is not reported.
    score_only = body.max_tokens == 0
    decoding = dataclasses.replace(
        _decoding(body, 1 if score_only else body.max_tokens, want_logprobs),
        top_logprobs=body.logprobs or 0,
        # Echoing token ids needs their text: the prompt tokens come back decoded.
        prompt_logprobs=body.echo and (want_logprobs or prompt_text is None),
    )
    request = await _request(
        body=body,
        prompt_ids=prompt_ids,
        decoding=decoding,
        engine=engine,
        settings=settings,
        registry=registry,
        names=engine_requests.FieldNames("prompt", "max_tokens", "stop"),
        prefix="cmpl",
        constraint=structured.from_openai_request(body),
    )
    created = int(time.time())

    if body.stream:
        envelope = _envelope(request, "text_completion", created, body.model)
        offset = 0  # where the next token's text starts in the streamed text

        def chunk(tok: TokenEvent | None, fin: FinishEvent | None) -> dict[str, Any] | None:
            nonlocal offset
            if tok is None and fin is None:
                return None
            if tok is not None and not tok.text and not want_logprobs:
                return None  # text held back, and no logprobs to report for the token
            choice: dict[str, Any] = {
                "index": 0,
                "text": tok.text if tok else "",
                "finish_reason": _reason(fin.reason) if fin else None,
                "logprobs": None,
            }
            if tok is not None and want_logprobs:
                logprobs = _completion_logprobs([_scored(tok)], [offset], bool(body.logprobs))
                choice["logprobs"] = logprobs.model_dump()
                offset += len(tok.token_text)
            return {**envelope, "choices": [choice]}

        return await _stream(http, body, engine, request, metrics, envelope, chunk)

    out = await engine_requests.collect(engine, request, metrics, http.receive)
    assert out.finish is not None
    generated = [] if score_only else [_scored(t) for t in out.tokens]
    text = "" if score_only else out.finish.generated_text
    # The prompt tokens' texts are their own in context: together, the prompt decoded whole.
    prompt = list(out.finish.prompt_logprobs) if body.echo else []
    echoed = ""
    if body.echo:
        echoed = "".join(t.text for t in prompt) if prompt_text is None else prompt_text
    response.headers.update(engine_requests.adapter_headers(out.finish.adapter_sha256))
    logprobs = None
    if want_logprobs:
        offsets = _offsets([t.text for t in prompt], 0)
        offsets += _offsets([t.text for t in generated], len(echoed))
        logprobs = _completion_logprobs(prompt + generated, offsets, bool(body.logprobs))
    text = echoed + text
    usage = _usage(out.finish)
    if score_only:
        usage = Usage(
            prompt_tokens=usage.prompt_tokens, completion_tokens=0, total_tokens=usage.prompt_tokens
        )
    return CompletionResponse(
        id=request.request_id,
        created=created,
        model=body.model,
        choices=[
            CompletionChoice(
                text=text,
                finish_reason=_reason(out.finish.reason),  # type: ignore[arg-type]
                logprobs=logprobs,
            )
        ],
        usage=usage,
        adapter_sha256=out.finish.adapter_sha256,
    )


def _messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(body.messages):
        if isinstance(m.content, list):
            if any(p.type != "text" for p in m.content):
                raise invalid_field(
                    f"messages.{i}.content", "only text content parts are supported"
                )
            text = "".join(p.text or "" for p in m.content)
        else:
            text = m.content or ""
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": text})
    return out


@router.post("/chat/completions", response_model=ChatCompletionResponse, summary="Chat completion")
async def chat_completions(
    http: Request,
    response: Response,
    body: ChatCompletionRequest,
    engine: EngineDep,
    settings: SettingsDep,
    registry: RegistryDep,
    metrics: MetricsDep,
) -> Any:
    _check_common(body)
    tool_plan = tools.plan(body.tools, body.tool_choice)
    if tool_plan is not None and body.stream:
        raise invalid_field("stream", "tool calls are not streamed; send stream: false")
    constraint = structured.from_openai_request(body)
    if tool_plan is not None:
        if constraint[0] is not None:
            param = constraint[1]
            raise invalid_field(param, f"give tools or {param}, not both")
        constraint = (tool_plan.spec, "tools")
    if body.top_logprobs is not None and not body.logprobs:
        raise invalid_field("top_logprobs", "needs logprobs=true")
    max_tokens = body.max_completion_tokens or body.max_tokens
    max_name = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    messages = _messages(body)
    if tool_plan is not None:
        messages = [{"role": "system", "content": tool_plan.system}, *messages]
    prompt = await engine.render_chat(messages)
    prompt_ids = await engine.tokenize(prompt)
    request = await _request(
        body=body,
        prompt_ids=prompt_ids,
        decoding=dataclasses.replace(
            _decoding(body, max_tokens, body.logprobs), top_logprobs=body.top_logprobs or 0
        ),
        engine=engine,
        settings=settings,
        registry=registry,
        names=engine_requests.FieldNames("messages", max_name, "stop"),
        prefix="chatcmpl",
        constraint=constraint,
    )
    created = int(time.time())

    def token_logprob(t: TokenEvent) -> ChatTokenLogprob:
        top = [
            {"token": a.text, "logprob": a.logprob, "bytes": list(a.text.encode())}
            for a in t.top_logprobs
        ]
        return ChatTokenLogprob(
            token=t.token_text,
            logprob=t.logprob or 0.0,
            bytes=list(t.token_text.encode()),
            top_logprobs=top,
        )

    if body.stream:
        envelope = _envelope(request, "chat.completion.chunk", created, body.model)

        def chunk(tok: TokenEvent | None, fin: FinishEvent | None) -> dict[str, Any] | None:
            if tok is None and fin is None:
                delta: dict[str, Any] = {"role": "assistant", "content": ""}
                opening = {"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}
                return {**envelope, "choices": [opening]}
            if tok is not None and not tok.text and not body.logprobs:
                return None  # text held back, and no logprobs to report for the token
            choice: dict[str, Any] = {
                "index": 0,
                "delta": {"content": tok.text} if tok else {},
                "finish_reason": _reason(fin.reason) if fin else None,
                "logprobs": None,
            }
            if tok is not None and body.logprobs:
                choice["logprobs"] = {"content": [token_logprob(tok).model_dump()]}
            return {**envelope, "choices": [choice]}

        return await _stream(http, body, engine, request, metrics, envelope, chunk)

    out = await engine_requests.collect(engine, request, metrics, http.receive)
    assert out.finish is not None
    response.headers.update(engine_requests.adapter_headers(out.finish.adapter_sha256))
    message = ChatMessageOut(content=out.finish.generated_text)
    finish_reason = _reason(out.finish.reason)
    calls = None if tool_plan is None else tools.tool_calls(out.finish.generated_text)
    if calls is not None and out.finish.reason == "eos":
        message, finish_reason = ChatMessageOut(content=None, tool_calls=calls), "tool_calls"
    return ChatCompletionResponse(
        id=request.request_id,
        created=created,
        model=body.model,
        choices=[
            ChatChoice(
                message=message,
                finish_reason=finish_reason,  # type: ignore[arg-type]
                logprobs=ChatLogprobs(content=[token_logprob(t) for t in out.tokens])
                if body.logprobs
                else None,
            )
        ],
        usage=_usage(out.finish),
        adapter_sha256=out.finish.adapter_sha256,
    )


def _card(engine: GenerationEngine, adapter_id: str | None, loaded: set[str]) -> ModelCard:
    """The base (adapter_id None) or one adapter, as `/v1/models` lists it."""
    now = int(time.time())
    if adapter_id is None:
        return ModelCard(
            id=engine.model_name,
            created=now,
            root=engine.model_name,
            status="loaded",
            loaded=True,
            max_model_len=engine.context_length,
        )
    return ModelCard(
        id=adapter_id,
        created=now,
        root=engine.model_name,
        parent=engine.model_name,
        status="loaded" if adapter_id in loaded else "stored",
        loaded=adapter_id in loaded,
        max_model_len=engine.context_length,
    )


def _loaded(engine: GenerationEngine) -> set[str]:
    stats = engine.stats()
    return set(stats.loaded_adapters) | set(stats.running_adapters)


@router.get("/models", response_model=ModelList, summary="The base model and every adapter")
async def models(engine: EngineDep, registry: RegistryDep) -> ModelList:
    ids = await registry.call(registry.list_ids)
    loaded = _loaded(engine)
    cards = [_card(engine, None, loaded)]
    cards += [_card(engine, a, loaded) for a in filter(auth.visible, ids)]
    return ModelList(data=cards)


@router.get("/models/{model:path}", response_model=ModelCard, summary="One model or adapter")
async def model(model: str, engine: EngineDep, registry: RegistryDep) -> ModelCard:
    adapter_id = conventions.adapter_for(model, engine)
    try:
        await engine_requests.check_adapter(registry, adapter_id, "model", count=False)
    except APIError as exc:
        raise conventions.openai_error(exc, model) from None
    return _card(engine, adapter_id, _loaded(engine))
