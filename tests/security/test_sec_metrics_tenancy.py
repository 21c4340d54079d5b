"""Issue 14, item 6: tenant leak through /metrics. Per-adapter labels name every tenant's
adapters, so with keys configured /metrics needs a metrics key or an admin key bound to no
tenant; a tenant key (inference or admin) never reads it, and `metrics_public` is refused
while tenants exist."""

from __future__ import annotations

import io

import pytest
from api_fakes import make_archive, running_app
from pydantic import ValidationError

from flora_server.settings import Settings

KEYS = {
    "api_keys": ["infA:tenantA", "infB:tenantB", "inf"],
    "admin_keys": ["adm", "admA:tenantA"],
    "metrics_keys": ["prom"],
}


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _serve_tenant_b(client) -> None:
    """Tenant B's adapter gets traffic, so it has its own metric label."""
    r = client.post(
        "/v1/adapters",
        headers=_h("adm"),
        data={"adapter_id": "tenantB.secret-project"},
        files={"archive": ("a.flora", io.BytesIO(make_archive()))},
    )
    assert r.status_code == 201, r.text
    body = {"inputs": "abc", "parameters": {"adapter_id": "tenantB.secret-project"}}
    r = client.post("/generate", headers=_h("infB"), json=body)
    assert r.status_code == 200, r.text


def test_tenant_keys_never_read_other_tenants_labels(tmp_path):
    # Keys configured, nothing said about metrics: the default must not be open.
    with running_app(tmp_path, **KEYS) as (client, _):
        _serve_tenant_b(client)
        r = client.get("/metrics")
        assert r.status_code == 401 and "tenantB" not in r.text
        for key in ("infA", "admA", "inf"):  # tenant A's keys, and a plain inference key
            r = client.get("/metrics", headers=_h(key))
            assert r.status_code == 403, (key, r.status_code)
            assert "tenantB" not in r.text and "metrics key" in r.json()["error"]["message"]
        # The operator's scraper and an untenanted admin read everything.
        for key in ("prom", "adm"):
            r = client.get("/metrics", headers=_h(key))
            assert r.status_code == 200, (key, r.text)
            assert 'adapter="tenantB.secret-project"' in r.text
        # A metrics key opens nothing else.
        assert client.post("/generate", headers=_h("prom"), json={"inputs": "x"}).status_code == 403
        assert client.get("/v1/adapters", headers=_h("prom")).status_code == 403
        for docs in ("/openapi.json", "/docs", "/redoc"):  # 403: known, but not for this
            r = client.get(docs, headers=_h("prom"))
            assert r.status_code == 403 and "metrics key" in r.json()["error"]["message"]
            assert client.get(docs, headers=_h("adm")).status_code == 200
            assert client.get(docs, headers=_h("nope")).status_code == 401
        assert client.get("/health").status_code == 200


def test_metrics_public_is_refused_while_tenants_exist(tmp_path):
    with pytest.raises(ValidationError, match="tenant"):
        Settings(home=tmp_path, api_keys=["infA:tenantA"], metrics_public=True)
    with pytest.raises(ValidationError, match="tenant"):
        Settings(home=tmp_path, metrics_keys=["prom:tenantA"])
    # Without tenants it stays available (every key sees every adapter anyway).
    assert Settings(home=tmp_path, api_keys=["k"], metrics_public=True).metrics_public


def test_open_server_keeps_open_metrics(tmp_path):
    with running_app(tmp_path) as (client, _):
        assert client.get("/metrics").status_code == 200
