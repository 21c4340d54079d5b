"""What a request body is, and which multipart parts a route takes: one owner for the routes
that read bodies by hand (`/v1/adapters`, `/v1/classify`).

- Media types are case-insensitive (RFC 9110 section 8.3.1): `Multipart/Form-Data` is
  `multipart/form-data`. `media_type` lower-cases the type and parses its parameters.
- A multipart form names its fields: a part with another name, a second part with a name
  that is not a list, or a file where a text value belongs (or the reverse) is a 422 naming
  the part, never silently ignored (a misspelt `adapter_id` must not run the base model).
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass

from python_multipart.multipart import parse_options_header

from flora_server.errors import APIError, invalid_field


def media_type(content_type: str | None) -> tuple[str, dict[bytes, bytes]]:
    """`Content-Type` -> (type/subtype lower-cased, parameters); ("", {}) when absent."""
    kind, options = parse_options_header(content_type or "")
    return kind.decode("latin-1"), options


@dataclass(frozen=True)
class FormFields:
    """The parts a multipart form takes: `text` fields, `files`, and the names of either
    that may be repeated (a list, such as `/v1/classify`'s `files`)."""

    text: tuple[str, ...]
    files: tuple[str, ...]
    repeatable: tuple[str, ...] = ()

    def part_error(
        self, name: str, seen: Container[str], *, is_file: bool | None
    ) -> APIError | None:
        """The 422 for a part called `name` after the parts in `seen`, or None when it is
        welcome. `is_file`: whether the part is a file upload (it has a filename); None for
        parsers that route parts by name only."""
        if name not in self.text and name not in self.files:
            return invalid_field(name or "form", "unexpected form field")
        if name in seen and name not in self.repeatable:
            return invalid_field(name, "given more than once")
        if is_file is True and name in self.text:
            return invalid_field(name, "send a text value, not a file")
        if is_file is False and name in self.files:
            return invalid_field(name, "send a file (a part with a filename), not a text value")
        return None
