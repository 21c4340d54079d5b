"""Invariants of the routing layer (components/inference-pool) and the metric names that
deploy/ depends on.

`routing_problems` checks that the InferencePool, the endpoint picker (EPP), its
configuration and the HTTPRoute fit together and fit the flora-serve pods. The metric-name
helpers list every metric the EPP configuration, the Grafana dashboard and the alert rules
read, so tests can compare them with what a real server exports on /metrics.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from deploy.crds import endpoint_picker_config_problems
from deploy.invariants import (
    EPP_NAME,
    metrics_need_key,
    of_kind,
    server_container,
    server_environment,
    serving,
)

Manifest = dict[str, Any]
ENGINE_LABEL = "llm-d.ai/engine-type"
EPP_CONFIG_KEY = "epp-config.yaml"
_SPEC_KEYS = ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec")
METRICS_SOURCE = "metrics-data-source"
# Parameters of the EPP's metrics-data-source that would make its scrapes present a bearer
# key. GAIE v1.5.0 has none: its parameters are scheme, path and insecureSkipVerify
# (deploy/crds.py), so the picker scrapes /metrics without an Authorization header.
METRICS_SOURCE_KEY_PARAMETERS: frozenset[str] = frozenset()
METRICS_PATH = "/metrics"


def _named(docs: list[Manifest], kind: str, name: str) -> Manifest | None:
    return next((d for d in of_kind(docs, kind) if d["metadata"]["name"] == name), None)


def epp_config(docs: list[Manifest]) -> dict[str, Any] | None:
    """The EndpointPickerConfig the EPP Deployment mounts (None when there is no EPP)."""
    epp = _named(docs, "Deployment", EPP_NAME)
    if epp is None:
        return None
    volumes = epp["spec"]["template"]["spec"].get("volumes", [])
    names = {v["configMap"]["name"] for v in volumes if "configMap" in v}
    for cm in of_kind(docs, "ConfigMap"):
        if cm["metadata"]["name"] in names and EPP_CONFIG_KEY in cm.get("data", {}):
            return yaml.safe_load(cm["data"][EPP_CONFIG_KEY])
    return None


def engine_specs(config: dict[str, Any]) -> dict[str, dict[str, str]]:
    """{engine name: its engineConfigs entry} of the core metrics extractor."""
    for plugin in config.get("plugins", []):
        if plugin["type"] == "core-metrics-extractor":
            entries = plugin.get("parameters", {}).get("engineConfigs", [])
            return {e["name"]: e for e in entries}
    return {}


def spec_metric_name(spec: str) -> str:
    """`name{label=value}` (the extractor's spec syntax) -> `name`."""
    return spec.partition("{")[0].strip()


def epp_metric_names(config: dict[str, Any]) -> dict[str, str]:
    """{spec key: metric name} for every non-empty spec of every custom engine."""
    out = {}
    for engine, entry in engine_specs(config).items():
        for key in _SPEC_KEYS:
            if entry.get(key):
                out[f"{engine}.{key}"] = spec_metric_name(entry[key])
    return out


def _pool_problems(docs: list[Manifest], pool: Manifest) -> Iterator[str]:
    server = next(d for d in of_kind(serving(docs), "Deployment"))
    labels = server["spec"]["template"]["metadata"]["labels"]
    selector = pool["spec"]["selector"]["matchLabels"]
    if not selector or any(labels.get(k) != v for k, v in selector.items()):
        yield "InferencePool does not select the flora-serve pods"
    ports = {p["containerPort"] for p in server_container(server)["ports"]}
    if {p["number"] for p in pool["spec"]["targetPorts"]} - ports:
        yield "InferencePool targetPorts are not flora-serve container ports"
    ref = pool["spec"]["endpointPickerRef"]
    service = _named(docs, "Service", ref["name"])
    if service is None:
        yield f"endpointPickerRef names no Service {ref['name']!r}"
    elif ref["port"]["number"] not in {p["port"] for p in service["spec"]["ports"]}:
        yield "endpointPickerRef port is not a port of the EPP Service"
    config = epp_config(docs)
    if config is None:
        yield "the EPP Deployment mounts no EndpointPickerConfig"
        return
    yield from endpoint_picker_config_problems(config)
    yield from metrics_scrape_problems(docs, config)
    engine = labels.get(ENGINE_LABEL)
    if engine not in engine_specs(config):
        yield f"pods are labelled {ENGINE_LABEL}={engine!r}, an engine the EPP config lacks"
    epp = _named(docs, "Deployment", EPP_NAME)
    args = server_container_args(epp)
    if args.get("--pool-name") != pool["metadata"]["name"]:
        yield "the EPP's --pool-name is not the InferencePool"


def epp_scrape_presents_key(config: dict[str, Any]) -> bool:
    """Whether the picker's metrics-data-source sends a bearer key with its scrapes."""
    return any(
        METRICS_SOURCE_KEY_PARAMETERS & set(plugin.get("parameters", {}))
        for plugin in config.get("plugins", [])
        if plugin["type"] == METRICS_SOURCE
    )


def blocks_metrics(route: Manifest) -> bool:
    """Whether an HTTPRoute answers `/metrics` (and everything under it) itself: a rule
    whose only match is PathPrefix /metrics and that has no backendRefs. Gateway API picks
    the longest matching prefix, so it wins over the rule for `/`."""
    for rule in route["spec"].get("rules", []):
        if rule.get("backendRefs"):
            continue
        for match in rule.get("matches", []):
            path = match.get("path", {})
            prefix = path.get("value", "").rstrip("/") if path.get("type") == "PathPrefix" else ""
            if set(match) == {"path"} and prefix == METRICS_PATH:
                return True
    return False


def metrics_scrape_problems(docs: list[Manifest], config: dict[str, Any]) -> list[str]:
    """The picker reads every pod's /metrics: when the pods want a key there, its scrapes
    must present one (else each scrape is 401 and routing runs blind). Where /metrics is
    open instead (FLORA_METRICS_PUBLIC, which the server refuses while a key is bound to a
    tenant), the HTTPRoute must not hand it to the gateway's clients."""
    pods = serving(docs)
    env = server_environment(pods, next(d for d in of_kind(pods, "Deployment")))
    if metrics_need_key(env):
        if not epp_scrape_presents_key(config):
            return [
                "the pods' /metrics needs a bearer key (keys configured, FLORA_METRICS_PUBLIC "
                f"off) but the EPP's {METRICS_SOURCE} sends none: every scrape is 401"
            ]
        return []
    return [
        f"/metrics is open on the pods, but HTTPRoute {route['metadata']['name']} forwards "
        f"it: add a rule for PathPrefix {METRICS_PATH} with no backendRefs"
        for route in of_kind(docs, "HTTPRoute")
        if not blocks_metrics(route)
    ]


def server_container_args(deployment: Manifest) -> dict[str, str]:
    """`--flag value` pairs of the first container's args."""
    args = deployment["spec"]["template"]["spec"]["containers"][0].get("args", [])
    return {a: b for a, b in itertools.pairwise(args) if a.startswith("--")}


def routing_problems(docs: list[Manifest]) -> list[str]:
    """Problems of the routing layer of a rendered overlay (none when it has none)."""
    pools = of_kind(docs, "InferencePool")
    if not pools:
        return []
    problems = [p for pool in pools for p in _pool_problems(docs, pool)]
    names = {pool["metadata"]["name"] for pool in pools}
    for route in of_kind(docs, "HTTPRoute"):
        refs = [b for rule in route["spec"]["rules"] for b in rule.get("backendRefs", [])]
        if not any(b.get("kind") == "InferencePool" and b["name"] in names for b in refs):
            problems.append(f"HTTPRoute {route['metadata']['name']} routes to no InferencePool")
    return problems


# -- metric names read by the dashboard and the alerts --------------------------------------

_PROMQL_WORDS = frozenset(
    {
        "sum",
        "rate",
        "irate",
        "increase",
        "avg",
        "max",
        "min",
        "count",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "histogram_quantile",
        "clamp_min",
        "clamp_max",
        "abs",
        "delta",
        "deriv",
        "offset",
        "bool",
        "and",
        "or",
        "unless",
        "topk",
        "bottomk",
        "quantile_over_time",
        "avg_over_time",
        "max_over_time",
        "min_over_time",
        "vector",
        "scalar",
        "time",
        "absent",
        "label_replace",
        "le",
        "inf",
        "nan",
    }
)
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads: identifiers that are not functions,
    keywords, label names inside `{...}` or `by (...)`, durations or numbers."""
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    text = re.sub(r"(?<![\w:])\d+(?:\.\d*)?(?:[eE][-+]?\d+)?", " ", text)  # numbers
    names = set()
    for match in _IDENT.finditer(text):
        word = match.group(0)
        after = text[match.end() :].lstrip()
        if word in _PROMQL_WORDS or after.startswith("("):
            continue
        names.add(word)
    return names


def family_name(metric: str) -> str:
    """The exported family of a sample name: `x_bucket`/`x_sum`/`x_count` -> `x`."""
    for suffix in _HISTOGRAM_SUFFIXES:
        if metric.endswith(suffix):
            return metric[: -len(suffix)]
    return metric


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL target expression of a Grafana dashboard (rows and panels nested)."""
    exprs = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    return exprs


def rule_exprs(rule: Manifest) -> list[str]:
    """Every expression of a PrometheusRule."""
    return [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]


def load_dashboard(root: Path) -> dict[str, Any]:
    return json.loads((root / "deploy" / "grafana" / "flora-serve.json").read_text())
