"""TGI/LoRAX-shaped `/generate` and `/generate_stream` bodies."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from flora_server.schemas.structured import LoraxResponseFormat, MergedAdapters, TGIGrammar


class GenerateParameters(BaseModel):
    # TGI/LoRAX clients send fields we do not use (adapter_source, api_token, ...): ignore
    # those; fields we cannot honour are rejected by the router with a 422 naming them.
    model_config = ConfigDict(extra="ignore")

    adapter_id: str | None = Field(None, description="adapter to apply; null for the base")
    max_new_tokens: int | None = Field(None, ge=1)
    do_sample: bool = False
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0)
    stop: list[str] = Field(default_factory=list)
    repetition_penalty: float | None = Field(None, gt=0)
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False
    best_of: int | None = Field(None, ge=1)
    top_n_tokens: int | None = Field(None, ge=0)
    typical_p: float | None = Field(None, gt=0, lt=1)
    watermark: bool = False
    truncate: int | None = None
    # LoRAX: structured output, where `adapter_id` comes from, and per-request merges.
    response_format: LoraxResponseFormat | None = None
    grammar: TGIGrammar | None = Field(None, description="TGI: JSON schema or regex")
    adapter_source: Literal["local", "s3", "hub", "pbase"] | None = None
    merged_adapters: MergedAdapters | None = None
    adapter_parameters: MergedAdapters | None = Field(
        None, description="the name LoRAX's router uses for merged_adapters"
    )


class GenerateRequest(BaseModel):
    inputs: str = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


FinishReasonTGI = Literal["length", "eos_token", "stop_sequence", "cancelled", "deadline"]


class Details(BaseModel):
    finish_reason: FinishReasonTGI
    generated_tokens: int
    prompt_tokens: int
    seed: int | None = None
    adapter_id: str | None = None
    tokens: list[Token] | None = None
    prefill: list[Token] = Field(default_factory=list)


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details


class StreamDetails(BaseModel):
    finish_reason: FinishReasonTGI
    generated_tokens: int
    prompt_tokens: int
    seed: int | None = None
    adapter_id: str | None = None


class StreamResponse(BaseModel):
    """One SSE event of `/generate_stream`."""

    token: Token | None
    generated_text: str | None = None
    details: StreamDetails | None = None
