"""The routing layer (components/inference-pool), the vendored CRD schemas, the metric-name
parser the dashboard/alert test relies on, and the workflow/Compose lint: each checker
passes the shipped files and fails a broken copy."""

from __future__ import annotations

import base64
import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.check import (
    doc_examples,
    find_tool,
    render,
    repo_root,
    run_schema_lint,
    schema_problems,
)
from deploy.crds import (
    SCHEMA_DIR,
    crd_to_schemas,
    endpoint_picker_config_problems,
    validate_custom_resource,
)
from deploy.invariants import (
    metrics_need_key,
    of_kind,
    one,
    overlay_problems,
    server_environment,
    serving,
)
from deploy.routing import (
    ENGINE_LABEL,
    blocks_metrics,
    epp_config,
    epp_metric_names,
    metrics_scrape_problems,
    promql_metric_names,
    routing_problems,
)

ROOT = repo_root()
Docs = list[dict[str, Any]]


@pytest.fixture(scope="module")
def pool_overlay() -> Docs:
    if shutil.which("kubectl") is None and shutil.which("kustomize") is None:
        pytest.skip("kubectl not installed")
    return render(ROOT / "deploy" / "k8s" / "overlays" / "inference-pool")


def _named(docs: Docs, kind: str, name: str) -> dict[str, Any]:
    return next(d for d in of_kind(docs, kind) if d["metadata"]["name"] == name)


def test_pool_overlay_fits_together(pool_overlay: Docs) -> None:
    assert routing_problems(pool_overlay) == []
    assert overlay_problems(pool_overlay, 10001) == []
    server = one(serving(pool_overlay), "Deployment")
    assert server["spec"]["template"]["metadata"]["labels"][ENGINE_LABEL] == "flora-serve"
    pool = one(pool_overlay, "InferencePool")
    assert pool["spec"]["endpointPickerRef"] == {
        "name": "flora-epp",
        "port": {"number": 9002},
        "failureMode": "FailOpen",
    }
    epp = _named(pool_overlay, "Deployment", "flora-epp")
    image = epp["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "registry.k8s.io/gateway-api-inference-extension/epp:v1.5.0"
    config = epp_config(pool_overlay)
    assert config is not None
    assert epp_metric_names(config) == {
        "flora-serve.queuedRequestsSpec": "flora_queue_length",
        "flora-serve.runningRequestsSpec": "flora_running_batch_size",
        "flora-serve.kvUsageSpec": "flora_kv_cache_usage_perc",
        "flora-serve.loraSpec": "vllm:lora_requests_info",
    }
    scorers = {p["pluginRef"] for p in config["schedulingProfiles"][0]["plugins"]}
    assert {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer"} <= scorers
    kinds = {d["kind"] for d in pool_overlay}
    assert {"InferencePool", "HTTPRoute", "Role", "RoleBinding", "NetworkPolicy"} <= kinds
    assert schema_problems(pool_overlay) == []


def test_routing_invariants_catch_broken_copies(pool_overlay: Docs) -> None:
    docs = copy.deepcopy(pool_overlay)
    one(docs, "InferencePool")["spec"]["selector"]["matchLabels"] = {"app": "other"}
    one(docs, "InferencePool")["spec"]["endpointPickerRef"]["port"]["number"] = 9999
    one(docs, "HTTPRoute")["spec"]["rules"][0]["backendRefs"][0]["name"] = "nothing"
    labels = one(serving(docs), "Deployment")["spec"]["template"]["metadata"]["labels"]
    labels[ENGINE_LABEL] = "vllm-typo"
    assert routing_problems(docs) == [
        "InferencePool does not select the flora-serve pods",
        "endpointPickerRef port is not a port of the EPP Service",
        f"pods are labelled {ENGINE_LABEL}='vllm-typo', an engine the EPP config lacks",
        "HTTPRoute flora-serve routes to no InferencePool",
    ]


def test_epp_scrapes_metrics_that_need_no_key_and_the_gateway_hides(
    pool_overlay: Docs, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = epp_config(pool_overlay)
    assert config is not None and metrics_scrape_problems(pool_overlay, config) == []
    server = one(serving(pool_overlay), "Deployment")
    env = server_environment(serving(pool_overlay), server)
    # Keys are configured (placeholders, no tenant), yet /metrics is open for the picker.
    assert env["FLORA_API_KEYS"] and env["FLORA_METRICS_PUBLIC"] == "true"
    assert metrics_need_key(env) is False
    route = one(pool_overlay, "HTTPRoute")
    assert blocks_metrics(route)
    assert route["spec"]["rules"][1] == {
        "matches": [{"path": {"type": "PathPrefix", "value": "/metrics"}}]
    }
    # The s3 overlay below keeps /metrics behind the key Prometheus sends.
    s3 = render(ROOT / "deploy" / "k8s" / "overlays" / "s3")
    assert metrics_need_key(server_environment(s3, one(s3, "Deployment"))) is True

    # The old overlay: keys and FLORA_METRICS_PUBLIC=false, a picker that sends no key.
    old = copy.deepcopy(pool_overlay)
    cm = next(c for c in of_kind(old, "ConfigMap") if "FLORA_METRICS_PUBLIC" in c["data"])
    cm["data"]["FLORA_METRICS_PUBLIC"] = "false"
    assert routing_problems(old) == [
        "the pods' /metrics needs a bearer key (keys configured, FLORA_METRICS_PUBLIC off) but "
        "the EPP's metrics-data-source sends none: every scrape is 401"
    ]
    # A picker that could present a key would satisfy it.
    monkeypatch.setattr("deploy.routing.METRICS_SOURCE_KEY_PARAMETERS", frozenset({"token"}))
    keyed = copy.deepcopy(config)
    source = next(p for p in keyed["plugins"] if p["type"] == "metrics-data-source")
    source["parameters"]["token"] = "/var/run/secrets/flora-metrics/token"
    assert metrics_scrape_problems(old, keyed) == []
    monkeypatch.undo()

    # Open /metrics forwarded by the gateway to its clients.
    exposed = copy.deepcopy(pool_overlay)
    del one(exposed, "HTTPRoute")["spec"]["rules"][1]
    assert routing_problems(exposed) == [
        "/metrics is open on the pods, but HTTPRoute flora-serve forwards it: add a rule for "
        "PathPrefix /metrics with no backendRefs"
    ]
    forwarded = copy.deepcopy(pool_overlay)
    rule = one(forwarded, "HTTPRoute")["spec"]["rules"][1]
    rule["backendRefs"] = one(forwarded, "HTTPRoute")["spec"]["rules"][0]["backendRefs"]
    assert not blocks_metrics(one(forwarded, "HTTPRoute"))

    # Open /metrics with a tenant-bound key: the server would refuse to start.
    tenant = copy.deepcopy(pool_overlay)
    secret = next(
        d for d in of_kind(tenant, "Secret") if d["metadata"]["name"].startswith("flora-api-keys")
    )
    secret["data"]["FLORA_API_KEYS"] = base64.b64encode(b"replace-me-key:acme").decode()
    assert overlay_problems(tenant, 10001) == [
        "FLORA_METRICS_PUBLIC is on but FLORA_API_KEYS binds a key to a tenant"
    ]


def test_pool_overlay_environment_is_accepted_by_the_server(
    pool_overlay: Docs, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings_module = pytest.importorskip("flora_server.settings")
    server = one(serving(pool_overlay), "Deployment")
    env = server_environment(serving(pool_overlay), server)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = settings_module.Settings()
    assert settings.metrics_public is True and settings.auth_enabled
    monkeypatch.setenv("FLORA_API_KEYS", "replace-me-key:acme")
    with pytest.raises(ValueError, match="cannot be on while a key is bound to a tenant"):
        settings_module.Settings()


def test_endpoint_picker_config_schema_is_strict(pool_overlay: Docs) -> None:
    config = epp_config(pool_overlay)
    assert config is not None and endpoint_picker_config_problems(config) == []
    bad = copy.deepcopy(config)
    extractor = next(p for p in bad["plugins"] if p["type"] == "core-metrics-extractor")
    extractor["parameters"]["engineConfigs"][0]["kvUsageSepc"] = "x"  # typo
    bad["schedulingProfiles"][0]["plugins"].append({"pluginRef": "prefix-cache-scorer"})
    problems = endpoint_picker_config_problems(bad)
    assert len(problems) == 2
    assert "'kvUsageSepc' was unexpected" in problems[0]
    assert problems[1] == "pluginRef 'prefix-cache-scorer' names no plugin"
    assert endpoint_picker_config_problems({**config, "schedulingProfile": []})[0].startswith(
        "EndpointPickerConfig: <root>: Additional properties"
    )
    loads = copy.deepcopy(config)
    loads["plugins"].append({"type": "low-queue-filter", "parameters": {"threshold": 8}})
    scorer = next(p for p in loads["plugins"] if p["type"] == "token-load-scorer")
    scorer["parameters"]["queueThresholdTokens"] = 0  # the scorer would take its default
    assert endpoint_picker_config_problems(loads) == [
        "plugin token-load-scorer: parameters.queueThresholdTokens: "
        "0 is less than the minimum of 1",
        "plugin type 'low-queue-filter' is not one GAIE v1.5.0 registers",
    ]


def test_vendored_crd_schemas_are_strict_and_traceable(pool_overlay: Docs) -> None:
    sources = json.loads((SCHEMA_DIR / "sources.json").read_text())
    assert {(s["kind"], s["tag"]) for s in sources} == {
        ("InferencePool", "v1.5.0"),
        ("HTTPRoute", "v1.4.1"),
    }
    for source in sources:
        assert len(source["commit"]) == 40 and len(source["sha256"]) == 64
        schema = json.loads((SCHEMA_DIR / source["file"]).read_text())
        assert schema["properties"]["kind"] == {"const": source["kind"]}
    route = copy.deepcopy(one(pool_overlay, "HTTPRoute"))
    assert validate_custom_resource(route) == []
    route["spec"]["rules"][0]["backendRefs"][0]["weigth"] = 1
    assert any("'weigth' was unexpected" in p for p in validate_custom_resource(route))
    pool = copy.deepcopy(one(pool_overlay, "InferencePool"))
    pool["spec"]["targetPorts"] = [{"number": 0}]  # the CRD's minimum is 1
    assert any("targetPorts.0.number" in p for p in validate_custom_resource(pool))


def test_crd_to_schemas_takes_the_storage_version() -> None:
    crd = {
        "spec": {
            "group": "x.io",
            "names": {"kind": "Thing"},
            "versions": [
                {"name": "v1alpha1", "storage": False, "schema": {"openAPIV3Schema": {}}},
                {
                    "name": "v1",
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {"type": "object", "properties": {"a": {"type": "string"}}},
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                    "properties": {},
                                },
                            },
                        }
                    },
                },
            ],
        }
    }
    schemas = crd_to_schemas(crd)
    assert list(schemas) == [("x.io/v1", "Thing")]
    schema = schemas[("x.io/v1", "Thing")]
    assert schema["properties"]["spec"]["additionalProperties"] is False
    assert "additionalProperties" not in schema["properties"]["status"]
    assert schema["required"] == ["apiVersion", "kind"]


def test_promql_metric_names() -> None:
    expr = (
        'sum by (namespace) (rate(flora_http_requests_total{status=~"5..",x="a(b)"}[5m]))'
        " / clamp_min(sum(rate(flora_http_requests_total[5m])), 1e-9) > 0.05"
        " and on (pod) vllm:lora_requests_info"
        " unless histogram_quantile(0.99, sum by (le) (rate(a_seconds_bucket[1h])))"
    )
    assert promql_metric_names(expr) == {
        "flora_http_requests_total",
        "vllm:lora_requests_info",
        "a_seconds_bucket",
    }


def test_workflow_and_compose_lint(tmp_path: Path) -> None:
    if find_tool("check-jsonschema") is None:
        pytest.skip("check-jsonschema not installed")
    assert run_schema_lint(ROOT) == []
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "image.yml").read_text())
    del workflow["jobs"]["build"]["timeout-minutes"]
    workflow["jobs"]["build"]["runs_on"] = "ubuntu-24.04"  # typo of runs-on
    (tmp_path / ".github" / "workflows" / "image.yml").write_text(yaml.safe_dump(workflow))
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    compose["services"]["gateway"]["port"] = ["8000:8000"]  # typo of ports
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(compose))
    problems = "\n".join(run_schema_lint(tmp_path))
    assert "vendor.github-workflows" in problems
    assert "custom.github-workflows-require-timeout" in problems
    assert "vendor.compose-spec" in problems
    # The shipped compose file: two replicas on one named volume for the store.
    shipped = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    replicas = [s for s in shipped["services"].values() if "flora-serve" in s.get("image", "")]
    assert len(replicas) == 2
    assert {v for s in replicas for v in s["volumes"]} == {"adapters:/var/lib/flora/adapters"}


def test_docs_show_the_shipped_extractor_config() -> None:
    examples = doc_examples((ROOT / "docs" / "deploy.md").read_text())
    shown = next(
        p
        for d in examples
        if isinstance(d, dict) and "plugins" in d and "kind" not in d
        for p in d["plugins"]
        if p["type"] == "core-metrics-extractor"
    )
    path = ROOT / "deploy" / "k8s" / "components" / "inference-pool" / "epp-config.yaml"
    shipped = yaml.safe_load(path.read_text())["plugins"]
    assert shown == next(p for p in shipped if p["type"] == "core-metrics-extractor")
