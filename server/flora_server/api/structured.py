"""Structured output for the generation routes: `response_format` (OpenAI and LoRAX shapes)
and TGI's `grammar` become a per-request `TokenConstraint` that the engine applies to that
row only."""

from __future__ import annotations

import dataclasses
import json

from flora_server.engine.constraints import ConstraintError, ConstraintSpec
from flora_server.engine.protocol import GenerationEngine, GenerationRequest
from flora_server.errors import invalid_field
from flora_server.schemas.openai import SamplingFields
from flora_server.schemas.structured import (
    LoraxResponseFormat,
    OpenAIResponseFormat,
    TGIGrammar,
)

# A schema is compiled before the request is queued; keep hostile ones small.
MAX_SCHEMA_CHARS = 32 * 1024


def from_openai(fmt: OpenAIResponseFormat | None) -> ConstraintSpec | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ConstraintSpec("json_object")
    assert fmt.json_schema is not None  # the model's validator
    return ConstraintSpec("json_schema", fmt.json_schema.schema_)


def from_openai_request(body: SamplingFields) -> tuple[ConstraintSpec | None, str]:
    """The constraint an OpenAI-route request asks for, and the field it came from:
    `response_format`, or one of vLLM's guided-decoding extras (`guided_json`: a JSON
    schema, as an object or a JSON string; `guided_regex`; `guided_choice`: exactly one of
    the strings). More than one of them is a 422."""
    given = [
        name
        for name in ("response_format", "guided_json", "guided_regex", "guided_choice")
        if getattr(body, name) is not None
    ]
    if len(given) > 1:
        raise invalid_field(given[1], f"give one of {', '.join(given)}, not several")
    if not given or given[0] == "response_format":
        return from_openai(body.response_format), "response_format"
    if body.guided_json is not None:
        schema = body.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise invalid_field("guided_json", f"is not JSON: {exc}") from None
            if not isinstance(schema, dict):
                raise invalid_field("guided_json", "must be a JSON schema object")
        return ConstraintSpec("json_schema", schema), "guided_json"
    if body.guided_regex is not None:
        return _regex(body.guided_regex, "guided_regex"), "guided_regex"
    assert body.guided_choice is not None
    if not all(body.guided_choice):
        raise invalid_field("guided_choice", "the choices must be non-empty strings")
    alternatives = "|".join(_literal(choice) for choice in body.guided_choice)
    return _regex(f"({alternatives})", "guided_choice"), "guided_choice"


def _literal(text: str) -> str:
    """`text` as a regular expression matching exactly it (the grammar engine's regex
    syntax: a backslash before each metacharacter, every other character itself)."""
    return "".join(f"\\{c}" if c in _REGEX_SYNTAX else c for c in text)


_REGEX_SYNTAX = frozenset("\\.^$*+?()[]{}|")


def _regex(pattern: str, param: str) -> ConstraintSpec:
    if len(pattern) > MAX_SCHEMA_CHARS:
        raise invalid_field(param, f"longer than {MAX_SCHEMA_CHARS} characters")
    return ConstraintSpec("regex", pattern=pattern)


def from_lorax(fmt: LoraxResponseFormat | None) -> ConstraintSpec | None:
    if fmt is None:
        return None
    if fmt.schema_:
        return ConstraintSpec("json_schema", fmt.schema_)
    return ConstraintSpec("json_object")


def from_tgi(grammar: TGIGrammar | None) -> ConstraintSpec | None:
    if grammar is None:
        return None
    if grammar.type == "regex":
        assert isinstance(grammar.value, str)  # the model's validator
        return _regex(grammar.value, "parameters.grammar")
    assert isinstance(grammar.value, dict)
    # `{}` is JSON Schema's accept-anything schema: any JSON value, still enforced.
    return ConstraintSpec("json_schema", grammar.value)


async def attach(
    engine: GenerationEngine,
    request: GenerationRequest,
    spec: ConstraintSpec | None,
    param: str,
) -> None:
    """Compile `spec` for `engine`'s tokenizer into `request.constraint` (422 naming
    `param` when the schema is too large, cannot be compiled, or the engine has no
    grammar support; a grammar found unsatisfiable while generating names `param` too).

    A constrained request ends where its grammar does: the grammar allows the end of
    sequence only once its text is complete, and then nothing else, so `ignore_eos` is
    turned off for it (generating on would either break the grammar or, with the matcher
    ended, emit end-of-sequence tokens until `max_new_tokens`)."""
    if spec is None:
        return
    if spec.schema is not None and len(json.dumps(spec.schema)) > MAX_SCHEMA_CHARS:
        raise invalid_field(param, f"the schema is larger than {MAX_SCHEMA_CHARS} characters")
    try:
        request.constraint = await engine.compile_constraint(dataclasses.replace(spec, field=param))
    except ConstraintError as exc:
        raise invalid_field(param, str(exc)) from None
    if request.params.ignore_eos:
        request.params = dataclasses.replace(request.params, ignore_eos=False)
