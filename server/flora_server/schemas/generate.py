"""TGI/LoRAX-shaped `/generate` and `/generate_stream` bodies."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from flora_server.schemas.limits import (
    Count,
    Penalty,
    PositiveCount,
    Probability,
    Seed,
    Temperature,
    ValidText,
)


class GenerateParameters(BaseModel):
    # TGI/LoRAX clients send fields we do not use (adapter_source, api_token, ...): ignore
    # those; fields we cannot honour are rejected by the router with a 422 naming them.
    model_config = ConfigDict(extra="ignore")

    adapter_id: ValidText | None = Field(None, description="adapter to apply; null for the base")
    max_new_tokens: PositiveCount | None = None
    do_sample: bool = False
    temperature: Temperature | None = None
    top_k: PositiveCount | None = None
    top_p: Probability | None = None
    seed: Seed | None = None
    stop: list[ValidText] = Field(default_factory=list)
    repetition_penalty: Penalty | None = None
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False
    best_of: PositiveCount | None = None
    top_n_tokens: Count | None = None
    typical_p: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False)
    watermark: bool = False
    truncate: Count | None = None


class GenerateRequest(BaseModel):
    inputs: ValidText = Field(min_length=1)
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
