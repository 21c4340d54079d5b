"""The status -> error type table of errors.py (docs/server.md, "Errors")."""

from __future__ import annotations

import pytest
from api_fakes import running_app

from flora_server.errors import APIError


@pytest.mark.parametrize(
    ("status", "type_"),
    [
        (401, "authentication_error"),
        (404, "not_found_error"),
        (413, "payload_too_large"),
        (429, "rate_limit_error"),
        (431, "request_header_fields_too_large"),
        (503, "service_unavailable"),
        (599, "server_error"),  # a status outside the table
    ],
)
def test_type_by_status(status: int, type_: str) -> None:
    assert APIError(status, "m").type == type_


def test_431_type_is_the_guards(tmp_path) -> None:
    """An APIError(431) (a handler or an HTTPException) reads like the header guard's 431."""
    with running_app(tmp_path, max_header_count=8) as (client, _):
        r = client.get("/health", headers={f"X-H{i}": "v" for i in range(20)})
    assert r.status_code == 431
    assert r.json()["error"]["type"] == APIError(431, "m").type
