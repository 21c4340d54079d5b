"""Property 14: schemathesis against the app's own /openapi.json, through the real app (the
fake engine behind it): no 5xx and conforming responses, with and without keys. Bounded
examples keep it to seconds."""

from __future__ import annotations

import pytest
import schemathesis
from api_fakes import running_app
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.timeout(300)

CHECKS = [schemathesis.checks.not_a_server_error, status_code_conformance]
CHECKS += [content_type_conformance, response_schema_conformance]


def _run(client, headers: dict[str, str]) -> int:
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app, headers=headers)
    ran = 0
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(
            max_examples=8,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy())
        def check(case) -> None:
            response = case.call(headers=headers)
            case.validate_response(response, checks=CHECKS)

        check()
        ran += 1
    return ran


@pytest.mark.parametrize("keyed", [False, True], ids=["open", "keys"])
def test_fuzzed_requests_never_5xx_and_conform(tmp_path, keyed):
    overrides = {"api_keys": ["inf"], "admin_keys": ["adm"]} if keyed else {}
    with running_app(tmp_path, **overrides) as (client, _):
        headers = {"Authorization": "Bearer adm"} if keyed else {}
        assert _run(client, headers) >= 8
