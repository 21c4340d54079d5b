"""JSON schemas for the custom resources this project ships, for offline validation.

kubernetes-validate knows only built-in kinds: for a CRD it warns "couldn't find schema" and
passes, which would let a typo through. Two sources:

- vendored: the `openAPIV3Schema` of upstream CRDs at a pinned release, converted by
  `crd_to_schemas` and committed under deploy/schemas/ (provenance, tag, commit and sha256
  in deploy/schemas/sources.json): the InferencePool (Gateway API Inference Extension) and
  HTTPRoute (Gateway API). Regenerate with `python -m deploy.crds CRD.yaml...`. CEL rules
  (`x-kubernetes-validations`) are not evaluated offline;
- written here from the API references, strict subsets for the operators' kinds
  (prometheus-operator ServiceMonitor and PrometheusRule, KEDA v2 ScaledObject): every field
  we use is typed and unknown fields are rejected. Using a new field means adding it here.

`endpoint_picker_config_problems` checks the endpoint picker's configuration file the same
way (its Go types decode strictly, so an unknown key would stop the picker at start-up).
"""

from __future__ import annotations

import copy
import functools
import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"

Schema = dict[str, Any]

_STRING: Schema = {"type": "string"}
_INT: Schema = {"type": "integer"}
_BOOL: Schema = {"type": "boolean"}
_LABELS: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION: Schema = {"type": "string", "pattern": r"^(0|([0-9]+(\.[0-9]+)?(ms|s|m|h))+)$"}


def _strict(properties: Schema, required: list[str] | None = None) -> Schema:
    return {
        "type": "object",
        "properties": properties,
        "required": required or [],
        "additionalProperties": False,
    }


_METADATA: Schema = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": _STRING,
        "labels": _LABELS,
        "annotations": _LABELS,
    },
}

_LABEL_SELECTOR: Schema = _strict({"matchLabels": _LABELS})


def _resource(api_version: str, kind: str, spec: Schema) -> Schema:
    return _strict(
        {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
        ["apiVersion", "kind", "metadata", "spec"],
    )


SERVICE_MONITOR = _resource(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    _strict(
        {
            "selector": _LABEL_SELECTOR,
            "namespaceSelector": _strict({"matchNames": {"type": "array", "items": _STRING}}),
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": _strict(
                    {
                        "port": _STRING,
                        "path": _STRING,
                        "scheme": {"enum": ["http", "https"]},
                        "interval": _DURATION,
                        "scrapeTimeout": _DURATION,
                        "authorization": _strict(
                            {
                                "type": _STRING,
                                "credentials": _strict(
                                    {"name": _STRING, "key": _STRING},
                                    ["name", "key"],
                                ),
                            }
                        ),
                    },
                    ["port"],
                ),
            },
        },
        ["selector", "endpoints"],
    ),
)

SCALED_OBJECT = _resource(
    "keda.sh/v1alpha1",
    "ScaledObject",
    _strict(
        {
            "scaleTargetRef": _strict(
                {"apiVersion": _STRING, "kind": _STRING, "name": _STRING}, ["name"]
            ),
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "pollingInterval": _INT,
            "cooldownPeriod": _INT,
            "triggers": {
                "type": "array",
                "minItems": 1,
                "items": _strict(
                    {
                        "type": {"const": "prometheus"},
                        "metadata": _strict(
                            {
                                "serverAddress": {"type": "string", "pattern": "^https?://"},
                                "query": _STRING,
                                # KEDA reads trigger metadata as strings only.
                                "threshold": {"type": "string", "pattern": r"^[0-9.]+$"},
                                "activationThreshold": _STRING,
                            },
                            ["serverAddress", "query", "threshold"],
                        ),
                    },
                    ["type", "metadata"],
                ),
            },
            "advanced": _strict(
                {
                    "horizontalPodAutoscalerConfig": _strict(
                        {"behavior": {"type": "object"}, "name": _STRING}
                    ),
                }
            ),
        },
        ["scaleTargetRef", "triggers"],
    ),
)

PROMETHEUS_RULE = _resource(
    "monitoring.coreos.com/v1",
    "PrometheusRule",
    _strict(
        {
            "groups": {
                "type": "array",
                "minItems": 1,
                "items": _strict(
                    {
                        "name": _STRING,
                        "interval": _DURATION,
                        "rules": {
                            "type": "array",
                            "minItems": 1,
                            "items": _strict(
                                {
                                    "alert": _STRING,
                                    "record": _STRING,
                                    "expr": {"type": "string", "minLength": 1},
                                    "for": _DURATION,
                                    "labels": _LABELS,
                                    "annotations": _LABELS,
                                },
                                ["expr"],
                            ),
                        },
                    },
                    ["name", "rules"],
                ),
            }
        },
        ["groups"],
    ),
)


def _strict_everywhere(node: Any) -> Any:
    """Reject unknown fields wherever a CRD schema lists its properties (as the API server
    prunes them and `kubectl apply --validate=strict` rejects them)."""
    if isinstance(node, dict):
        node = {k: _strict_everywhere(v) for k, v in node.items()}
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict_everywhere(v) for v in node]
    return node


def crd_to_schemas(crd: dict[str, Any]) -> dict[tuple[str, str], Schema]:
    """{(apiVersion, kind): JSON schema} for the storage version of a CustomResourceDefinition:
    its openAPIV3Schema made strict, with apiVersion, kind and metadata pinned."""
    spec = crd["spec"]
    out: dict[tuple[str, str], Schema] = {}
    for version in spec["versions"]:
        if not version.get("storage"):
            continue
        api = f"{spec['group']}/{version['name']}"
        schema = _strict_everywhere(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
        schema["properties"]["apiVersion"] = {"const": api}
        schema["properties"]["kind"] = {"const": spec["names"]["kind"]}
        schema["properties"]["metadata"] = _METADATA
        schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind"})
        out[(api, spec["names"]["kind"])] = schema
    return out


@functools.cache
def vendored_schemas() -> dict[tuple[str, str], Schema]:
    """The schemas committed under deploy/schemas/, by (apiVersion, kind)."""
    sources = json.loads((SCHEMA_DIR / "sources.json").read_text())
    return {
        (src["apiVersion"], src["kind"]): json.loads((SCHEMA_DIR / src["file"]).read_text())
        for src in sources
    }


CRD_SCHEMAS: dict[tuple[str, str], Schema] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
}


def validate_custom_resource(resource: dict[str, Any]) -> list[str]:
    """Errors of `resource` against its schema here; one error if the kind is unknown."""
    key = (resource.get("apiVersion", ""), resource.get("kind", ""))
    schema = CRD_SCHEMAS.get(key) or vendored_schemas().get(key)
    if schema is None:
        return [f"no schema for custom resource {key[0]} {key[1]}"]
    validator = jsonschema.Draft202012Validator(schema)
    name = resource.get("metadata", {}).get("name", "?")
    return [
        f"{key[1]}/{name}: {'.'.join(map(str, error.path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(resource)
    ]


# EndpointPickerConfig (inference.networking.x-k8s.io/v1alpha1, GAIE v1.5.0
# apix/config/v1alpha1/endpointpickerconfig_types.go) and the parameters of the plugins we
# configure (their Go structs): the picker decodes the file strictly.
_ENGINE_CONFIG: Schema = _strict(
    {
        name: _STRING
        for name in (
            "name",
            "queuedRequestsSpec",
            "runningRequestsSpec",
            "kvUsageSpec",
            "loraSpec",
            "cacheInfoSpec",
            "cacheBlockSizeLabelName",
            "cacheNumBlocksLabelName",
            "cacheBlockSizeSpec",
            "cacheNumBlocksSpec",
        )
    },
    ["name", "queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec"],
)
PLUGIN_PARAMETERS: dict[str, Schema] = {
    "core-metrics-extractor": _strict(
        {
            "engineLabelKey": _STRING,
            "defaultEngine": _STRING,
            "engineConfigs": {"type": "array", "items": _ENGINE_CONFIG},
        }
    ),
    "metrics-data-source": _strict(
        {"scheme": {"enum": ["http", "https"]}, "path": _STRING, "insecureSkipVerify": _BOOL}
    ),
    # tokenload.Config: a value <= 0 would silently fall back to the 4Mi-token default.
    "token-load-scorer": _strict({"queueThresholdTokens": {"type": "integer", "minimum": 1}}),
}
# Scheduling, request-data and data-layer plugin types GAIE v1.5.0's EPP registers
# (cmd/epp/runner/runner.go, registerInTreePlugins): a type outside it fails the picker's
# start. (Its filters are prefix-cache-affinity-filter and testing ones: the older
# low-queue, least-queue, lora-affinity and decision-tree filters are gone.)
EPP_PLUGIN_TYPES = frozenset(
    {
        "prefix-cache-scorer",
        "max-score-picker",
        "random-picker",
        "weighted-random-picker",
        "single-profile-handler",
        "kv-cache-utilization-scorer",
        "queue-scorer",
        "running-requests-size-scorer",
        "lora-affinity-scorer",
        "token-load-scorer",
        "approx-prefix-cache-producer",
        "predicted-latency-scorer",
        "predicted-latency-producer",
        "latency-slo-admitter",
        "prefix-cache-affinity-filter",
        "latency-scorer",
        "inflight-load-producer",
        "metrics-data-source",
        "core-metrics-extractor",
        "request-attribute-reporter",
        "openai-parser",
        "vllmgrpc-parser",
        "passthrough-parser",
        "concurrency-detector",
        "utilization-detector",
    }
)
ENDPOINT_PICKER_CONFIG: Schema = _strict(
    {
        "apiVersion": {"const": "inference.networking.x-k8s.io/v1alpha1"},
        "kind": {"const": "EndpointPickerConfig"},
        "featureGates": {"type": "array", "items": _STRING},
        "plugins": {
            "type": "array",
            "minItems": 1,
            "items": _strict(
                {"name": _STRING, "type": _STRING, "parameters": {"type": "object"}}, ["type"]
            ),
        },
        "schedulingProfiles": {
            "type": "array",
            "items": _strict(
                {
                    "name": _STRING,
                    "plugins": {
                        "type": "array",
                        "items": _strict(
                            {"pluginRef": _STRING, "weight": {"type": "number"}}, ["pluginRef"]
                        ),
                    },
                },
                ["name", "plugins"],
            ),
        },
        "saturationDetector": _strict({"pluginRef": _STRING}),
        "dataLayer": _strict(
            {
                "sources": {
                    "type": "array",
                    "items": _strict(
                        {
                            "pluginRef": _STRING,
                            "extractors": {
                                "type": "array",
                                "items": _strict({"pluginRef": _STRING}, ["pluginRef"]),
                            },
                        },
                        ["pluginRef"],
                    ),
                }
            }
        ),
        "flowControl": {"type": "object"},
        "parser": _strict({"pluginRef": _STRING}, ["pluginRef"]),
    },
    ["apiVersion", "kind", "plugins"],
)


def endpoint_picker_config_problems(config: dict[str, Any]) -> list[str]:
    """Schema errors of an EndpointPickerConfig, of its known plugins' parameters, and
    references (profile and data-layer pluginRefs) to plugins it does not define."""
    validator = jsonschema.Draft202012Validator(ENDPOINT_PICKER_CONFIG)
    problems = [
        f"EndpointPickerConfig: {'.'.join(map(str, e.path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(config)
    ]
    if problems:
        return problems
    names = set()
    for plugin in config["plugins"]:
        names.add(plugin.get("name") or plugin["type"])
        if plugin["type"] not in EPP_PLUGIN_TYPES:
            problems.append(f"plugin type {plugin['type']!r} is not one GAIE v1.5.0 registers")
        schema = PLUGIN_PARAMETERS.get(plugin["type"])
        if schema is not None and "parameters" in plugin:
            for e in jsonschema.Draft202012Validator(schema).iter_errors(plugin["parameters"]):
                where = ".".join(map(str, e.path)) or "<root>"
                problems.append(f"plugin {plugin['type']}: parameters.{where}: {e.message}")
    refs = [
        p["pluginRef"] for prof in config.get("schedulingProfiles", []) for p in prof["plugins"]
    ]
    for source in config.get("dataLayer", {}).get("sources", []):
        refs += [source["pluginRef"], *(x["pluginRef"] for x in source.get("extractors", []))]
    problems += [f"pluginRef {ref!r} names no plugin" for ref in refs if ref not in names]
    return problems


def main(argv: list[str]) -> None:
    """`python -m deploy.crds CRD.yaml...`: print the schemas `crd_to_schemas` makes (the
    vendoring step; sources.json records where each came from)."""
    for path in argv:
        for key, schema in crd_to_schemas(yaml.safe_load(Path(path).read_text())).items():
            print(json.dumps({"key": list(key), "schema": schema}, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1:])
