"""OpenAI-shaped completions, chat completions and models bodies."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from flora_server.schemas.limits import (
    Count,
    Penalty,
    PositiveCount,
    Probability,
    Seed,
    TokenId,
    ValidText,
)
from flora_server.schemas.structured import OpenAIResponseFormat

MAX_LOGPROBS = 20  # most alternatives per token (vLLM's default max_logprobs)
MAX_CHOICES = 256  # guided_choice alternatives
MAX_STOP_TOKEN_IDS = 64
MAX_ALLOWED_TOKEN_IDS = 1 << 18  # more than any vocabulary served here


class StreamOptions(BaseModel):
    include_usage: bool = False


def _vllm_unset(*unset: Any) -> AfterValidator:
    """The rule of a vLLM extra this server does not honour: null or one of its `unset`
    values (what it means when left out) is accepted, any other value refused (a 422
    naming the field), since ignoring it would answer a different question than the
    client asked."""
    shown = ", ".join(json.dumps(u) for u in (None, *unset))

    def check(value: Any) -> Any:
        if value is not None and not any(value == u and type(value) is type(u) for u in unset):
            raise ValueError(f"a vLLM option this server does not support (accepted: {shown})")
        return value

    return AfterValidator(check)


# The types of vLLM's extras (sampling, prompt and chat fields, sent through `extra_body`)
# that this server does not honour, by the values that leave them unset. `top_k`,
# `repetition_penalty`, `ignore_eos`, `stop_token_ids`, `guided_json`, `guided_regex` and
# `guided_choice` are honoured (typed fields below).
_NullOnly = Annotated[Any, _vllm_unset()]
_Off = Annotated[Any, _vllm_unset(False)]
_On = Annotated[Any, _vllm_unset(True)]
_One = Annotated[Any, _vllm_unset(1, 1.0)]
_NoItems = Annotated[Any, _vllm_unset([])]
_NoEntries = Annotated[Any, _vllm_unset({})]


def _default_for_null(model: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """OpenAI's spec (and vLLM) make these fields nullable: an explicit null is the
    default, as if the field were not sent."""
    if value is None and info.field_name is not None:
        return model.model_fields[info.field_name].default
    return value


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: ValidText = Field(min_length=1, description="an adapter id, or the base model's name")
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: Probability | None = None
    n: PositiveCount = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: ValidText | list[ValidText] | None = None
    seed: Seed | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM-style extras (openai clients send them through `extra_body`).
    top_k: PositiveCount | None = None
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: Penalty | None = None
    response_format: OpenAIResponseFormat | None = None
    # vLLM extras honoured here: generate through EOS; structured output as vLLM's
    # guided decoding names it (at most one of these and `response_format`); a minimum
    # length
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    allowed_token_ids: list[TokenId] | None = Field(
        None, max_length=MAX_ALLOWED_TOKEN_IDS, description="the only tokens to generate"
    )
    guided_json: dict[str, Any] | ValidText | None = None
    guided_regex: ValidText | None = Field(None, min_length=1)
    guided_choice: list[ValidText] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    min_tokens: Count | None = Field(
        None, description="tokens generated before EOS, stop_token_ids or stop may end the output"
    )

    # `echo` and chat's `logprobs` are the subclasses' (completions' `logprobs` is None
    # by default anyway)
    _nullable = field_validator(
        "n", "stream", "echo", "logprobs", mode="before", check_fields=False
    )(classmethod(_default_for_null))

    # vLLM extras not honoured: only their unset values pass (see `_vllm_unset`)
    use_beam_search: _Off = None
    length_penalty: _One = None
    include_stop_str_in_output: _Off = None
    skip_special_tokens: _On = None
    spaces_between_special_tokens: _On = None
    truncate_prompt_tokens: _NullOnly = None
    prompt_logprobs: _NullOnly = None
    bad_words: _NoItems = None
    logits_processors: _NoItems = None
    return_tokens_as_token_ids: _Off = None
    guided_grammar: _NullOnly = None
    guided_decoding_backend: _NullOnly = None
    guided_whitespace_pattern: _NullOnly = None
    structural_tag: _NullOnly = None
    structured_outputs: _NullOnly = None

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return value


class CompletionRequest(SamplingFields):
    prompt: ValidText | list[ValidText] | list[TokenId] | list[list[TokenId]]
    max_tokens: Count | None = Field(None, description="0 with echo: score the prompt only")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: PositiveCount | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: ValidText | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: ValidText | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: PositiveCount | None = None
    max_completion_tokens: PositiveCount | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    # vLLM's chat extras not honoured: only their unset values pass (see `_vllm_unset`)
    echo: _Off = None
    add_generation_prompt: _On = None
    continue_final_message: _Off = None
    chat_template: _NullOnly = None
    chat_template_kwargs: _NoEntries = None
    documents: _NoItems = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None  # one per token, null without a logprob
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    adapter_sha256: str | None = Field(
        None,
        description="flora extension: sha256 of the stored adapter bytes that served this "
        "completion; null for the base model",
    )


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[dict[str, Any]] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: Literal["stop", "length", "tool_calls"] | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    adapter_sha256: str | None = Field(
        None,
        description="flora extension: sha256 of the stored adapter bytes that served this "
        "completion; null for the base model",
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "flora"
    root: str
    parent: str | None = None
    status: Literal["loaded", "stored"] = Field(
        description="loaded: resident on this replica's device; stored: in the adapter store"
    )
    loaded: bool
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
