"""The one owner of the multipart-field rule and of media-type parsing (`api/forms.py`),
used by `/v1/adapters` and `/v1/classify`."""

from __future__ import annotations

import pytest

from flora_server.api.forms import FormFields, media_type

FORM = FormFields(text=("adapter_id", "top_k"), files=("files",), repeatable=("files",))


@pytest.mark.parametrize(
    ("header", "kind", "options"),
    [
        ("application/json", "application/json", {}),
        ("Application/JSON; Charset=UTF-8", "application/json", {b"charset": b"UTF-8"}),
        ("Multipart/Form-Data; Boundary=AbC", "multipart/form-data", {b"boundary": b"AbC"}),
        ("", "", {}),
        (None, "", {}),
    ],
)
def test_media_type_is_lower_cased_and_keeps_parameter_values(
    header: str | None, kind: str, options: dict
) -> None:
    # RFC 9110: type, subtype and parameter names are case-insensitive; the boundary's
    # value is not (it is matched byte for byte).
    assert media_type(header) == (kind, options)


@pytest.mark.parametrize(
    ("name", "seen", "is_file", "message"),
    [
        ("adapter", set(), False, "adapter: unexpected form field"),
        ("", set(), False, "form: unexpected form field"),
        ("adapter_id", {"adapter_id"}, False, "adapter_id: given more than once"),
        ("adapter_id", set(), True, "adapter_id: send a text value, not a file"),
        ("files", set(), False, "files: send a file (a part with a filename), not a text value"),
    ],
)
def test_unwelcome_parts_are_422_naming_the_part(
    name: str, seen: set, is_file: bool, message: str
) -> None:
    error = FORM.part_error(name, seen, is_file=is_file)
    assert error is not None
    assert (error.status, error.message, error.param) == (422, message, name or "form")


def test_welcome_parts() -> None:
    assert FORM.part_error("files", {"files", "top_k"}, is_file=True) is None  # a list
    assert FORM.part_error("top_k", {"files"}, is_file=False) is None
    # Parsers that route parts by name (the adapter upload) do not check the kind.
    assert FORM.part_error("files", set(), is_file=None) is None
    assert FORM.part_error("adapter_id", set(), is_file=None) is None
