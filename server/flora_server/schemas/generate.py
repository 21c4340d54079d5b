"""TGI/LoRAX-shaped bodies of `/`, `/generate`, `/generate_stream` and `/info`.

Requests accept every field that TGI's, LoRAX's and `huggingface_hub`'s clients send (they
send their whole parameter object, nulls included), and refuse any other field with a 422
naming it, so a typo such as `max_token` is never silently ignored. Fields declared here but
not honoured are refused by the router when set. Responses follow TGI's and LoRAX's types
(`text_generation.types`, `lorax.types`, `huggingface_hub`'s `TextGenerationOutput`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from flora_server.schemas.limits import (
    Penalty,
    PositiveCount,
    Probability,
    Seed,
    Temperature,
    ValidText,
)
from flora_server.schemas.structured import LoraxResponseFormat, MergedAdapters, TGIGrammar

# Most alternatives one request may ask for per position (vLLM's default max_logprobs).
MAX_TOP_N = 20


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter_id: ValidText | None = Field(None, description="adapter to apply; null for the base")
    api_token: str | None = Field(None, description="LoRAX: hub token (unused: no network)")
    max_new_tokens: PositiveCount | None = None
    do_sample: bool = False
    temperature: Temperature | None = None
    top_k: PositiveCount | None = None
    top_p: Probability | None = None
    seed: Seed | None = None
    stop: list[ValidText] = Field(default_factory=list)
    repetition_penalty: Penalty | None = None
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False
    best_of: PositiveCount | None = None
    top_n_tokens: int | None = Field(None, ge=0, le=MAX_TOP_N)
    return_k_alternatives: int | None = Field(None, ge=0, le=MAX_TOP_N)
    typical_p: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False)
    watermark: bool = False
    truncate: PositiveCount | None = Field(None, description="keep only the last N prompt tokens")
    ignore_eos_token: bool = False
    # LoRAX: structured output, where `adapter_id` comes from, and per-request merges.
    response_format: LoraxResponseFormat | None = None
    grammar: TGIGrammar | None = Field(None, description="TGI: JSON schema or regex")
    adapter_source: Literal["local", "s3", "hub", "pbase"] | None = None
    merged_adapters: MergedAdapters | None = None
    adapter_parameters: MergedAdapters | None = Field(
        None, description="the name LoRAX's router uses for merged_adapters"
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _null_stop(cls, v: Any) -> Any:
        return [] if v is None else v


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: ValidText = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False

    @field_validator("parameters", mode="before")
    @classmethod
    def _null_parameters(cls, v: Any) -> Any:
        return {} if v is None else v


class AlternativeToken(BaseModel):
    id: int
    text: str
    logprob: float


class Token(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool = False
    # LoRAX: tokens accepted from a speculative draft; this server does not speculate.
    skipped: bool = False
    alternative_tokens: list[AlternativeToken] | None = None  # LoRAX return_k_alternatives


class InputToken(BaseModel):
    """A prompt token (`decoder_input_details`); the first has no logprob."""

    id: int
    text: str
    logprob: float | None = None


# TGI's FinishReason has exactly these three; a request cut by its deadline reports
# "length" here (as the OpenAI routes do), and a cancelled one has no reader left.
FinishReasonTGI = Literal["length", "eos_token", "stop_sequence"]


class Details(BaseModel):
    finish_reason: FinishReasonTGI
    generated_tokens: int
    prompt_tokens: int
    skipped_tokens: int = 0
    seed: int | None = None
    adapter_id: str | None = None
    prefill: list[InputToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] | None = None
    best_of_sequences: list[dict[str, Any]] | None = None
    adapter_sha256: str | None = Field(
        None, description="sha256 of the stored adapter bytes that served this; null for the base"
    )


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details


class StreamDetails(BaseModel):
    finish_reason: FinishReasonTGI
    generated_tokens: int
    prompt_tokens: int
    input_length: int  # TGI's name for prompt_tokens in streams
    skipped_tokens: int = 0
    seed: int | None = None
    adapter_id: str | None = None
    adapter_sha256: str | None = Field(
        None, description="sha256 of the stored adapter bytes that served this; null for the base"
    )


class StreamResponse(BaseModel):
    """One SSE event of `/generate_stream` (and of `/` with `stream: true`)."""

    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class TGIError(BaseModel):
    """TGI's flat error body, what the TGI routes answer (api/tgi_errors.py)."""

    error: str
    error_type: str
    param: str | None = None


TGI_ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": TGIError, "description": text}
    for status, text in {
        401: "missing or unknown API key",
        403: "the key may not use this route",
        404: "unknown adapter",
        422: "a field is invalid or unknown (error_type validation; param names it)",
        429: "the queue is full (error_type overloaded; see Retry-After)",
        503: "the model is not loaded yet (error_type overloaded)",
    }.items()
}


class Info(BaseModel):
    """`GET /info`: TGI's `Info` fields (what `huggingface_hub`'s `get_endpoint_info`
    returns), plus LoRAX's adapter count."""

    model_config = ConfigDict(protected_namespaces=())

    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str | None = "text-generation"
    max_concurrent_requests: int
    max_best_of: int = 1
    max_stop_sequences: int
    max_input_length: int
    max_input_tokens: int
    max_total_tokens: int
    waiting_served_ratio: float = 0.0
    max_batch_total_tokens: int
    max_waiting_tokens: int = 0
    max_batch_size: int | None = None
    validation_workers: int = 1
    max_client_batch_size: int = 1
    max_adapters: int
    router: str = "flora-serve"
    version: str
    sha: str | None = None
    docker_label: str | None = None
