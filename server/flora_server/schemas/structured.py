"""Request fields of the compatibility slice: structured output (`response_format`) in the
OpenAI and LoRAX shapes, and LoRAX's `merged_adapters`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flora_server.schemas.limits import Probability

# A merge weight scales an adapter's factors: any finite number (NaN and Infinity, which
# Python's JSON parser accepts, are a 422 here rather than a broken merge later).
MergeWeight = Annotated[float, Field(allow_inf_nan=False)]


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class OpenAIResponseFormat(BaseModel):
    """`{"type": "text"}`, `{"type": "json_object"}` or
    `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> OpenAIResponseFormat:
        # `{}` is JSON Schema's accept-anything schema: any JSON value, still enforced
        given = self.json_schema is not None and self.json_schema.schema_ is not None
        if self.type == "json_schema" and not given:
            raise ValueError("type json_schema needs json_schema.schema")
        return self


class LoraxResponseFormat(BaseModel):
    """LoRAX's `parameters.response_format`: `{"type": "json_object", "schema": {...}}`
    (without `schema`: any JSON object)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["json_object"]
    schema_: dict[str, Any] | None = Field(None, alias="schema")


class MergedAdapters(BaseModel):
    """LoRAX's `parameters.merged_adapters`: one adapter made per request from stored ones."""

    model_config = ConfigDict(extra="forbid")

    ids: list[str] = Field(min_length=1, max_length=8)
    weights: list[MergeWeight] = Field(min_length=1, max_length=8)
    merge_strategy: Literal["linear", "ties", "dare_linear", "dare_ties"] = "linear"
    majority_sign_method: Literal["total", "frequency"] = "total"
    density: Probability = 1.0

    @model_validator(mode="after")
    def _same_length(self) -> MergedAdapters:
        if len(self.ids) != len(self.weights):
            raise ValueError(f"{len(self.ids)} ids but {len(self.weights)} weights")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("ids must be distinct")
        return self


class TGIGrammar(BaseModel):
    """TGI's `parameters.grammar`: `{"type": "json", "value": <JSON schema>}` or
    `{"type": "regex", "value": "<pattern>"}`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["json", "json_object", "regex"]
    value: dict[str, Any] | str

    @model_validator(mode="after")
    def _value_matches_type(self) -> TGIGrammar:
        if self.type == "regex" and not isinstance(self.value, str):
            raise ValueError("a regex grammar's value is the pattern string")
        if self.type != "regex" and not isinstance(self.value, dict):
            raise ValueError("a json grammar's value is a JSON schema object")
        return self
