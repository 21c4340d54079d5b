"""JSON schemas for the custom resources this project ships, for offline validation.

kubernetes-validate knows only built-in kinds: for a CRD it warns "couldn't find schema" and
passes, which would let a typo through. These schemas are strict subsets of the upstream CRD
schemas (prometheus-operator v0.7x ServiceMonitor, KEDA v2 ScaledObject, Gateway API
Inference Extension v1 InferencePool), written from their API references: every field we
use is typed and unknown fields are rejected. Using a new upstream field means adding it here.
"""

from __future__ import annotations

from typing import Any

import jsonschema

Schema = dict[str, Any]

_STRING: Schema = {"type": "string"}
_INT: Schema = {"type": "integer"}
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

INFERENCE_POOL = _resource(
    "inference.networking.k8s.io/v1",
    "InferencePool",
    _strict(
        {
            "selector": _LABEL_SELECTOR,
            "targetPorts": {
                "type": "array",
                "minItems": 1,
                "maxItems": 8,
                "items": _strict({"number": {"type": "integer", "minimum": 1}}, ["number"]),
            },
            "endpointPickerRef": _strict(
                {
                    "group": _STRING,
                    "kind": _STRING,
                    "name": _STRING,
                    "port": _strict({"number": _INT}, ["number"]),
                    "failureMode": {"enum": ["FailOpen", "FailClose"]},
                },
                ["name"],
            ),
        },
        ["selector", "targetPorts", "endpointPickerRef"],
    ),
)

CRD_SCHEMAS: dict[tuple[str, str], Schema] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("inference.networking.k8s.io/v1", "InferencePool"): INFERENCE_POOL,
}


def validate_custom_resource(resource: dict[str, Any]) -> list[str]:
    """Errors of `resource` against its schema here; one error if the kind is unknown."""
    key = (resource.get("apiVersion", ""), resource.get("kind", ""))
    schema = CRD_SCHEMAS.get(key)
    if schema is None:
        return [f"no schema for custom resource {key[0]} {key[1]}"]
    validator = jsonschema.Draft202012Validator(schema)
    name = resource.get("metadata", {}).get("name", "?")
    return [
        f"{key[1]}/{name}: {'.'.join(map(str, error.path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(resource)
    ]
