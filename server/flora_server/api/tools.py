"""OpenAI tool calls on `/v1/chat/completions`, made direct by the grammar engine.

With `tool_choice` `"required"` or `{"type": "function", "function": {"name": ...}}`, the
answer is constrained (per row, like `response_format`) to one JSON call
`{"name": <a tool's name>, "arguments": <that tool's parameters schema>}`, and returned as
`message.tool_calls` with `finish_reason` `"tool_calls"`. The tools are described to the
model in a system message. `"none"` generates plain text. `"auto"` (OpenAI's default when
tools are given) would need the model's own tool-call format and a parser for it, which the
embedded models do not have: it is a 422 that says which choices work.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from flora_server.engine.constraints import ConstraintSpec
from flora_server.errors import invalid_field

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class ToolPlan:
    """What the request asked for: the constraint and the system message to prepend."""

    spec: ConstraintSpec
    system: str


def _tools(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if tool.get("type") == "function" else None
        if not isinstance(fn, dict):
            raise invalid_field(f"tools.{i}", "must be {type: function, function: {...}}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise invalid_field(f"tools.{i}.function.name", "must match ^[A-Za-z0-9_-]{1,64}$")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise invalid_field(f"tools.{i}.function.parameters", "must be a JSON schema object")
        out[name] = {"description": fn.get("description", ""), "parameters": params}
    return out


def plan(tools: list[dict[str, Any]] | None, tool_choice: Any) -> ToolPlan | None:
    """None: no tool call to make (no tools, or `tool_choice` `"none"`). A `tool_choice`
    other than `"none"` without tools is refused, as OpenAI and vLLM refuse it (it asks
    for a call no tool can answer)."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise invalid_field("tool_choice", "only allowed when tools are given")
        return None
    if tool_choice == "none":
        return None
    table = _tools(tools)
    if tool_choice is None or tool_choice == "auto":
        raise invalid_field(
            "tool_choice",
            "'auto' needs the model's own tool-call format, which this model lacks; send "
            "tool_choice 'required' or {'type': 'function', 'function': {'name': ...}}",
        )
    if tool_choice == "required":
        names = list(table)
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in table:
            raise invalid_field("tool_choice", f"names no tool in tools: {name!r}")
        names = [name]
    else:
        raise invalid_field("tool_choice", "must be 'none', 'required' or a named function")
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": n}, "arguments": table[n]["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for n in names
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    described = [{"name": n, **table[n]} for n in names]
    system = (
        "You can call these functions. Answer with one call as JSON "
        '{"name": ..., "arguments": {...}}.\n' + json.dumps(described)
    )
    return ToolPlan(ConstraintSpec("json_schema", schema), system)


def tool_calls(text: str) -> list[dict[str, Any]] | None:
    """The `message.tool_calls` of a finished constrained answer (None when it was cut
    short and is not a whole call)."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
        }
    ]
