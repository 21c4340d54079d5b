"""Request-level checks of the compatibility routes on the fake engine: structured output,
adapter_source, merged_adapters and vLLM's load/unload_lora_adapter (no model)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from api_fakes import make_archive, running_app

from flora_server.adapters.local_source import LocalPathError, confined_path


@pytest.fixture
def lora_root(tmp_path: Path) -> Path:
    root = tmp_path / "loras"
    (root / "one").mkdir(parents=True)
    (root / "one" / "a.flora").write_bytes(make_archive())
    return root


@pytest.fixture
def app(tmp_path, lora_root):
    with running_app(tmp_path, lora_dirs=[str(lora_root)]) as pair:
        yield pair


def _generate(client, **parameters):
    return client.post("/generate", json={"inputs": "hi", "parameters": parameters})


def _generate_raw(client, **parameters):
    """As `_generate`, with NaN and infinities sent as the literals Python's JSON parser
    reads (`NaN`, `Infinity`), which httpx's own JSON encoding refuses."""
    body = json.dumps({"inputs": "hi", "parameters": parameters})
    return client.post("/generate", content=body, headers={"content-type": "application/json"})


def test_confined_path_follows_symlinks_and_dotdot_before_comparing(tmp_path, lora_root):
    outside = tmp_path / "outside"
    outside.mkdir()
    (lora_root / "link").symlink_to(outside, target_is_directory=True)
    assert confined_path(str(lora_root / "one"), [lora_root]) == (lora_root / "one").resolve()
    assert confined_path("one", [lora_root]) == (lora_root / "one").resolve()  # relative
    for bad in (str(lora_root / "link"), f"{lora_root}/../outside", "../outside", "/"):
        with pytest.raises(LocalPathError, match="outside") as info:
            confined_path(bad, [lora_root])
        assert not info.value.missing
    with pytest.raises(LocalPathError) as info:
        confined_path(str(lora_root / "nope"), [lora_root])
    assert info.value.missing
    with pytest.raises(LocalPathError, match="disabled"):
        confined_path(str(lora_root / "one"), [])


def test_structured_output_needs_an_engine_with_grammars_and_a_schema(app):
    client, _ = app
    # the fake engine compiles no grammar: a clear 422, never unconstrained text
    r = _generate(client, response_format={"type": "json_object"})
    assert r.status_code == 422 and "parameters.response_format" in r.text
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "fake-base",
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "n"}},
        },
    )
    assert r.status_code == 422 and "json_schema.schema" in r.text
    r = _generate(client, response_format={"type": "regex", "schema": {}})
    assert r.status_code == 422
    r = _generate(client, grammar={"type": "regex", "value": "a+"})
    assert r.status_code == 422 and "parameters.grammar" in r.text
    r = _generate(client, grammar={"type": "regex", "value": {"a": 1}})
    assert r.status_code == 422 and "pattern string" in r.text
    both = {"grammar": {"type": "regex", "value": "a"}, "response_format": {"type": "json_object"}}
    r = _generate(client, **both)
    assert r.status_code == 422 and "not both" in r.text
    ok = client.post(
        "/v1/completions",
        json={"model": "fake-base", "prompt": "x", "response_format": {"type": "text"}},
    )
    assert ok.status_code == 200, ok.text


def test_adapter_source_hub_is_422_and_local_reads_only_allowed_paths(app, lora_root, tmp_path):
    client, engine = app
    r = _generate(client, adapter_id="org/name", adapter_source="hub")
    assert r.status_code == 422 and "network" in r.text
    r = _generate(client, adapter_id=str(lora_root / "one" / "a.flora"), adapter_source="local")
    assert r.status_code == 200, r.text
    derived = r.json()["details"]["adapter_id"]
    assert derived.startswith("local-") and engine.requests[-1].adapter_id == derived
    again = _generate(client, adapter_id=str(lora_root / "one" / "a.flora"), adapter_source="local")
    assert again.json()["details"]["adapter_id"] == derived  # keyed by content: reused
    r = _generate(client, adapter_id=str(tmp_path), adapter_source="local")
    assert r.status_code == 422 and "outside" in r.text
    r = _generate(client, adapter_id=str(lora_root / "missing"), adapter_source="local")
    assert r.status_code == 404


def test_a_home_directory_of_no_such_user_is_a_refused_path(app, lora_root):
    """`~user` of a user that does not exist cannot be expanded: refused as any path
    outside --lora-dirs is (422 on the TGI route, 400 on vLLM's), never a 500."""
    client, engine = app
    path = "~nosuchuser123/x"
    with pytest.raises(LocalPathError, match="home directory"):
        confined_path(path, [lora_root])
    r = _generate(client, adapter_id=path, adapter_source="local")
    assert r.status_code == 422 and "home directory" in r.text, r.text
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "h", "lora_path": path})
    assert r.status_code == 400 and "home directory" in r.text, r.text
    assert engine.requests == []


def test_vllm_lora_routes_are_503_while_the_base_loads(app, lora_root, tmp_path):
    """Before the base is loaded, which stored adapters are this server's is unknown:
    load and unload are 503 with Retry-After, as DELETE /v1/adapters/ID is (unload was a
    500)."""
    from flora_server.adapters.registry import AdapterRegistry
    from flora_server.adapters.store import LocalAdapterStore

    client, _ = app
    loading = AdapterRegistry(LocalAdapterStore(tmp_path / "store"), tmp_path / "up")
    assert not loading.can_validate
    client.app.state.registry = loading
    path = str(lora_root / "one" / "a.flora")
    for route, body in (
        ("/v1/unload_lora_adapter", {"lora_name": "x"}),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path}),
    ):
        r = client.post(route, json=body)
        assert r.status_code == 503 and r.headers["Retry-After"] == "5", (route, r.text)
        assert "still loading" in r.text
    assert client.delete("/v1/adapters/x").status_code == 503


def test_merged_adapters_request_errors(app):
    client, _ = app
    merge = {"ids": ["a", "b"], "weights": [1.0]}
    assert _generate(client, merged_adapters=merge).status_code == 422
    merge = {"ids": ["a", "b"], "weights": [1.0, 2.0], "merge_strategy": "svd"}
    assert _generate(client, merged_adapters=merge).status_code == 422
    merge = {"ids": ["a", "b"], "weights": [1.0, 2.0]}
    r = _generate(client, merged_adapters=merge, adapter_id="a")
    assert r.status_code == 422 and "adapter_id or merged_adapters" in r.text
    r = _generate(client, merged_adapters=merge)
    assert r.status_code == 404 and "'a'" in r.text


def test_merge_weights_and_density_must_be_finite_and_the_422_names_them(app):
    """Python's JSON parser reads NaN and Infinity: refused by the schema, naming the weight,
    not blamed later on the stored adapter's files. Nothing is merged or queued."""
    client, engine = app
    for field in ("merged_adapters", "adapter_parameters"):
        for bad in (float("nan"), float("inf"), float("-inf")):
            merge = {"ids": ["a", "b"], "weights": [0.5, bad]}
            r = _generate_raw(client, max_new_tokens=2, **{field: merge})
            assert r.status_code == 422, (field, bad, r.text)
            assert r.json()["param"] == f"parameters.{field}.weights.1"
            assert r.json()["error"] == (
                f"parameters.{field}.weights.1: Input should be a finite number"
            )
        merge = {"ids": ["a"], "weights": [1.0], "density": float("nan")}
        r = _generate_raw(client, **{field: merge})
        assert r.status_code == 422 and r.json()["param"] == f"parameters.{field}.density"
    assert engine.requests == []


def test_load_lora_adapter_confined_named_and_vllm_shaped(app, lora_root, tmp_path):
    client, engine = app
    post = client.post
    path = str(lora_root / "one" / "a.flora")
    r = post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'x' added successfully."
    assert client.get("/v1/adapters/x").status_code == 200
    r = post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
    assert r.status_code == 400 and "has already been loaded" in r.text
    r = post(
        "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path, "load_inplace": True}
    )
    assert r.status_code == 200
    os.symlink(tmp_path, lora_root / "esc")
    for bad_path in (str(tmp_path), str(lora_root / "esc"), f"{lora_root}/../"):
        r = post("/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": bad_path})
        assert r.status_code == 400 and "outside" in r.text, bad_path
    r = post("/v1/load_lora_adapter", json={"lora_name": "../y", "lora_path": path})
    assert r.status_code == 400 and "lora_name" in r.text
    r = post("/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": str(lora_root)})
    assert r.status_code == 422 and "expected a PEFT LoRA" in r.text
    assert post("/v1/unload_lora_adapter", json={"lora_name": "x"}).status_code == 200
    assert "x" in engine.invalidated
    r = post("/v1/unload_lora_adapter", json={"lora_name": "x"})
    assert r.status_code == 404 and "cannot be found" in r.text


def test_lora_routes_need_the_admin_key(tmp_path, lora_root):
    keys = {"api_keys": ["inf-key"], "admin_keys": ["adm-key"], "lora_dirs": [str(lora_root)]}
    with running_app(tmp_path, **keys) as (client, _):
        body = {"lora_name": "x", "lora_path": str(lora_root / "one" / "a.flora")}
        assert client.post("/v1/load_lora_adapter", json=body).status_code == 401
        inf = {"Authorization": "Bearer inf-key"}
        assert client.post("/v1/load_lora_adapter", json=body, headers=inf).status_code == 403
        adm = {"Authorization": "Bearer adm-key"}
        assert client.post("/v1/load_lora_adapter", json=body, headers=adm).status_code == 200


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({}, "tool_choice"),  # auto: the model has no tool-call format
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required", "stream": True}, "stream"),
        (
            {"tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ],
)
def test_tool_call_requests_that_cannot_be_served_are_422(app, extra, param):
    client, _ = app
    body = {"model": "fake-base", "messages": [{"role": "user", "content": "x"}]}
    r = client.post("/v1/chat/completions", json={**body, "tools": [WEATHER], **extra})
    assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text


def test_tool_choice_none_generates_text_and_bad_tools_are_422(app):
    client, _ = app
    body = {"model": "fake-base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
    r = client.post(
        "/v1/chat/completions", json={**body, "tools": [WEATHER], "tool_choice": "none"}
    )
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    bad = {"type": "function", "function": {"name": "has space"}}
    r = client.post(
        "/v1/chat/completions", json={**body, "tools": [bad], "tool_choice": "required"}
    )
    assert r.status_code == 422 and "tools.0.function.name" in r.text
