"""OpenAI and vLLM conventions the OpenAI routes share: how `model` names the base or an
adapter (`<base>:<adapter>` too), the error codes OpenAI's clients key on, and the prompt
shapes and `top_logprobs` entries of `/v1/completions`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flora_server.api import engine_requests
from flora_server.engine.protocol import GenerationEngine, Logprob
from flora_server.errors import APIError, invalid_field
from flora_server.schemas.openai import CompletionRequest


def adapter_for(model: str, engine: GenerationEngine) -> str | None:
    """`model` names the base, an adapter, or `<base>:<adapter>` (as SGLang and Ray Serve
    name an adapter on a base)."""
    if model == engine.model_name:
        return None
    base, sep, adapter = model.partition(":")
    if sep and base == engine.model_name and adapter:
        return adapter
    return model


def openai_error(exc: APIError, model: str) -> APIError:
    """What OpenAI (and vLLM) answer for the errors its clients key on: 404
    `model_not_found` for an unknown model, 400 `context_length_exceeded` with the
    "maximum context length is N tokens" message (LangChain's and LiteLLM's fallbacks)."""
    if isinstance(exc, engine_requests.ContextLengthError):
        total = exc.n_prompt + exc.max_new
        return APIError(
            400,
            f"This model's maximum context length is {exc.context_length} tokens. However, you "
            f"requested {total} tokens ({exc.n_prompt} in the messages, {exc.max_new} in the "
            "completion). Please reduce the length of the messages or completion.",
            type="invalid_request_error",
            param=exc.param,
            code="context_length_exceeded",
        )
    if exc.status == 404 and exc.param == "model":
        # Another base's adapter keeps the reason (the base it was trained for).
        reason = f" ({exc.message})" if exc.code == "adapter_of_other_base" else ""
        return APIError(
            404,
            f"The model `{model}` does not exist or you do not have access to it.{reason}",
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )
    return exc


async def completion_prompt(
    body: CompletionRequest, engine: GenerationEngine
) -> tuple[list[int], str | None]:
    """The prompt's token ids and its text (None for token ids). One prompt per request: a
    string, token ids, or a list holding one of those (lm-eval sends `[[ids]]`)."""
    prompt: Any = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise invalid_field("prompt", "only one prompt per request is supported")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return await engine.tokenize(prompt), prompt
    return [int(t) for t in prompt], None


def top_logprob(
    text: str, logprob: float | None, top: Sequence[Logprob]
) -> dict[str, float] | None:
    """One `top_logprobs` entry: the most likely alternatives and the token itself (as vLLM
    reports them); null where there is no logprob (the first prompt token), so the list
    stays aligned with `tokens`. `text` is the token's own text, by the rule its
    alternatives' texts follow (engine/text.py), so a token among them is listed once."""
    if logprob is None:
        return None
    entry = {t.text: t.logprob for t in top if t.logprob is not None}
    entry.setdefault(text, logprob)
    return entry
