"""Project-specific invariants of a rendered overlay, beyond what schemas can say.

Schemas check that each object is well formed; these check that the objects fit together
and keep the promises in docs/deploy.md: probes on the right routes, the drain arithmetic,
selectors that select, references that resolve, placeholder-only secrets, GPU consistency,
every directory the server writes on a writable volume (deploy.writes), no tenant key beside
an open /metrics; and two promises outside the manifests that lean on them: the image's
HEALTHCHECK means what the readinessProbe means, and the page's curl calls that post JSON
say so. Every function returns a list of problems (empty when all is well).
"""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from deploy.dockerfile import duration_seconds
from deploy.writes import write_path_problems

Manifest = dict[str, Any]

NAMESPACE = "flora"
PLACEHOLDER_PREFIX = "replace-me"
QUEUE_METRIC = "flora_queue_length"
EPP_NAME = "flora-epp"
ROUTING_KINDS = frozenset({"InferencePool", "HTTPRoute"})
# What pydantic reads as True from an environment variable (case-insensitive).
TRUE_WORDS = frozenset({"1", "on", "t", "true", "y", "yes"})


@dataclass(frozen=True)
class Image:
    """What the manifests need to know about the image (from the Dockerfile): its uid, its
    ENV, and the models its build prepares into FLORA_HOME (None: not known)."""

    uid: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    prepared_models: frozenset[str] | None = None


def of_kind(docs: list[Manifest], kind: str) -> list[Manifest]:
    """The rendered objects of one kind."""
    return [doc for doc in docs if doc.get("kind") == kind]


def one(docs: list[Manifest], kind: str) -> Manifest:
    """The single object of `kind` (ValueError when there is not exactly one)."""
    found = of_kind(docs, kind)
    if len(found) != 1:
        raise ValueError(f"expected one {kind}, found {len(found)}")
    return found[0]


def server_container(deployment: Manifest) -> Manifest:
    """The flora-serve container of the Deployment's pod template."""
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "flora-serve")


def serving(docs: list[Manifest]) -> list[Manifest]:
    """The flora-serve objects of an overlay: everything but the routing layer (the endpoint
    picker's objects, the InferencePool and the HTTPRoute; deploy.routing checks those)."""
    return [
        d
        for d in docs
        if d.get("kind") not in ROUTING_KINDS
        and d.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/name") != EPP_NAME
    ]


def config_data(docs: list[Manifest], deployment: Manifest) -> dict[str, str]:
    """Merged data of every ConfigMap the server container takes its environment from."""
    names = {
        ref["configMapRef"]["name"]
        for ref in server_container(deployment).get("envFrom", [])
        if "configMapRef" in ref
    }
    data: dict[str, str] = {}
    for cm in of_kind(docs, "ConfigMap"):
        if cm["metadata"]["name"] in names:
            data.update(cm.get("data", {}))
    return data


def _object_data(docs: list[Manifest], kind: str, name: str) -> dict[str, str] | None:
    """The decoded data of the rendered ConfigMap or Secret `name` (None if not rendered)."""
    obj = next((d for d in of_kind(docs, kind) if d["metadata"]["name"] == name), None)
    if obj is None:
        return None
    if kind == "Secret":
        data = {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}
        return {**data, **obj.get("stringData", {})}
    return dict(obj.get("data", {}))


def server_environment(
    docs: list[Manifest], deployment: Manifest, image_env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The server process's environment: the image's ENV, then `envFrom` (ConfigMaps and
    Secrets, in order), then `env` (values, and references resolved against the rendered
    objects; a reference to an object or key that is not rendered leaves the variable
    unset, as an optional one does in the cluster)."""
    env = dict(image_env or {})
    container = server_container(deployment)
    for ref in container.get("envFrom", []):
        for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
            if key in ref:
                env.update(_object_data(docs, kind, ref[key]["name"]) or {})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var.get("valueFrom", {})
        for key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
            if key in source:
                data = _object_data(docs, kind, source[key]["name"]) or {}
                if source[key]["key"] in data:
                    env[var["name"]] = data[source[key]["key"]]
    return env


def _keys(env: Mapping[str, str], name: str) -> list[str]:
    return [k.strip() for k in env.get(name, "").split(",") if k.strip()]


def metrics_public(env: Mapping[str, str]) -> bool:
    """FLORA_METRICS_PUBLIC is on (as pydantic reads a boolean)."""
    return env.get("FLORA_METRICS_PUBLIC", "").strip().lower() in TRUE_WORDS


def metrics_need_key(env: Mapping[str, str]) -> bool:
    """Whether the server's /metrics answers only a bearer key (api/deps.py
    `require_metrics_access`): some key is configured and FLORA_METRICS_PUBLIC is off."""
    if metrics_public(env):
        return False
    names = ("FLORA_API_KEYS", "FLORA_ADMIN_KEYS", "FLORA_METRICS_KEYS")
    return any(_keys(env, name) for name in names)


def prestop_sleep_seconds(container: Manifest) -> int:
    """Seconds the preStop hook waits: `sleep N` exec, or the native sleep action."""
    hook = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in hook:
        return int(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0].endswith("sleep"):
        return int(command[1])
    return 0


def drain_budget(docs: list[Manifest]) -> tuple[int, float, int]:
    """(preStop sleep, FLORA_SHUTDOWN_TIMEOUT, terminationGracePeriodSeconds) of the server.

    Kubernetes runs preStop, then sends SIGTERM, then SIGKILL when the grace period ends,
    counted from the start of preStop: the drain is cut short unless
    grace > preStop + shutdown_timeout.
    """
    docs = serving(docs)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    drain = float(config_data(docs, deployment).get("FLORA_SHUTDOWN_TIMEOUT", "30"))
    return (
        prestop_sleep_seconds(server_container(deployment)),
        drain,
        int(pod.get("terminationGracePeriodSeconds", 30)),
    )


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _probe_problems(container: Manifest, port_names: set[str]) -> Iterator[str]:
    expected = {"startupProbe": "/ready", "readinessProbe": "/ready", "livenessProbe": "/health"}
    for probe, path in expected.items():
        get = container.get(probe, {}).get("httpGet", {})
        if get.get("path") != path:
            yield f"{probe} must GET {path}, has {get.get('path')!r}"
        if get.get("port") not in port_names:
            yield f"{probe} port {get.get('port')!r} is not a named container port"


def _security_problems(pod: Manifest, container: Manifest, uid: int | None) -> Iterator[str]:
    psc, csc = pod.get("securityContext", {}), container.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True:
        yield "pod securityContext.runAsNonRoot must be true"
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        yield "pod seccompProfile must be RuntimeDefault"
    if uid is not None and psc.get("runAsUser") != uid:
        yield f"runAsUser {psc.get('runAsUser')} != the image's uid {uid}"
    if csc.get("readOnlyRootFilesystem") is not True:
        yield "container readOnlyRootFilesystem must be true"
    if csc.get("allowPrivilegeEscalation") is not False:
        yield "container allowPrivilegeEscalation must be false"
    if csc.get("capabilities", {}).get("drop") != ["ALL"]:
        yield "container must drop ALL capabilities"


def _volume_problems(docs: list[Manifest], pod: Manifest, container: Manifest) -> Iterator[str]:
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    for path, name in mounts.items():
        if name not in volumes:
            yield f"volumeMount {path} names missing volume {name!r}"
    if "emptyDir" not in volumes.get(mounts.get("/tmp", ""), {}):
        yield "/tmp must be an emptyDir (read-only root filesystem)"
    env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
    for var in ("HF_HOME", "XDG_CACHE_HOME"):
        home = env.get(var, "")
        if not any(home.startswith(p) and "emptyDir" in volumes[n] for p, n in mounts.items()):
            yield f"{var}={home!r} is not on an emptyDir volume"
    claims = {p.get("metadata", {}).get("name"): p for p in of_kind(docs, "PersistentVolumeClaim")}
    for volume in volumes.values():
        claim = volume.get("persistentVolumeClaim", {}).get("claimName")
        if claim is not None and claim not in claims:
            yield f"volume {volume['name']!r} claims missing PVC {claim!r}"


def _tenant_problems(env: Mapping[str, str]) -> Iterator[str]:
    """FLORA_METRICS_PUBLIC with a tenant-bound key: the server refuses to start."""
    if not metrics_public(env):
        return
    for name in ("FLORA_API_KEYS", "FLORA_ADMIN_KEYS"):
        if any(":" in key for key in _keys(env, name)):
            yield f"FLORA_METRICS_PUBLIC is on but {name} binds a key to a tenant"


def _store_problems(docs: list[Manifest], deployment: Manifest) -> Iterator[str]:
    store = config_data(docs, deployment).get("FLORA_ADAPTER_STORE", "")
    container = server_container(deployment)
    pod = deployment["spec"]["template"]["spec"]
    if store.startswith("s3://"):
        if of_kind(docs, "PersistentVolumeClaim"):
            yield "S3 store configured but a PVC is still rendered"
        return
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mount = next((m for m in container.get("volumeMounts", []) if m["mountPath"] == store), None)
    claim_name = (
        volumes.get(mount["name"], {}).get("persistentVolumeClaim", {}).get("claimName")
        if mount
        else None
    )
    if claim_name is None:
        yield f"FLORA_ADAPTER_STORE={store!r} is not a PVC mount"
        return
    claim = next(
        c for c in of_kind(docs, "PersistentVolumeClaim") if c["metadata"]["name"] == claim_name
    )
    shared = "ReadWriteMany" in claim["spec"].get("accessModes", [])
    if not shared and deployment["spec"].get("replicas") != 1:
        yield "a ReadWriteOnce adapter store needs exactly one replica"


def _autoscaling_problems(docs: list[Manifest], deployment: Manifest) -> Iterator[str]:
    name = deployment["metadata"]["name"]
    hpas, scaled = of_kind(docs, "HorizontalPodAutoscaler"), of_kind(docs, "ScaledObject")
    if len(hpas) + len(scaled) > 1:
        yield "more than one autoscaler targets the Deployment"
    for hpa in hpas:
        if hpa["spec"]["scaleTargetRef"]["name"] != name:
            yield "HPA does not target the Deployment"
        metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if "pods" in m]
        if metrics != [QUEUE_METRIC]:
            yield f"HPA must scale on {QUEUE_METRIC}, uses {metrics}"
    for obj in scaled:
        if obj["spec"]["scaleTargetRef"]["name"] != name:
            yield "ScaledObject does not target the Deployment"
        if not any(QUEUE_METRIC in t["metadata"]["query"] for t in obj["spec"]["triggers"]):
            yield f"ScaledObject must query {QUEUE_METRIC}"
    strategy = deployment["spec"].get("strategy", {})
    if strategy.get("type") == "Recreate":
        if hpas or scaled or deployment["spec"].get("replicas") != 1:
            yield "Recreate is only for the single-replica local overlay"
    elif strategy.get("rollingUpdate", {}).get("maxUnavailable") != 0:
        yield "rollingUpdate.maxUnavailable must be 0 (no capacity dropped on upgrade)"


def _selector_problems(docs: list[Manifest], deployment: Manifest) -> Iterator[str]:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = server_container(deployment)
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    services = of_kind(docs, "Service")
    for svc in services:
        if not _selects(svc["spec"]["selector"], labels):
            yield f"Service {svc['metadata']['name']} does not select the pods"
        for port in svc["spec"]["ports"]:
            if port["targetPort"] not in port_names:
                yield f"Service port {port['name']} targets unknown port {port['targetPort']}"
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        if not _selects(pdb["spec"]["selector"]["matchLabels"], labels):
            yield "PodDisruptionBudget does not select the pods"
    for policy in of_kind(docs, "NetworkPolicy"):
        if not _selects(policy["spec"]["podSelector"]["matchLabels"], labels):
            yield "NetworkPolicy does not select the pods"
        allowed = {p["port"] for rule in policy["spec"].get("ingress", []) for p in rule["ports"]}
        if not set(port_names.values()) <= allowed:
            yield "NetworkPolicy blocks the serving port"
    service_ports = {p["name"] for svc in services for p in svc["spec"]["ports"]}
    service_labels = [svc["metadata"].get("labels", {}) for svc in services]
    for monitor in of_kind(docs, "ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        if not any(_selects(selector, lab) for lab in service_labels):
            yield "ServiceMonitor selects no Service"
        for endpoint in monitor["spec"]["endpoints"]:
            if endpoint["port"] not in service_ports or endpoint.get("path") != "/metrics":
                yield "ServiceMonitor must scrape /metrics on a named Service port"


def _reference_problems(docs: list[Manifest], deployment: Manifest) -> Iterator[str]:
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for ref in server_container(deployment).get("envFrom", []):
        for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
            if key in ref and (kind, ref[key]["name"]) not in names:
                yield f"envFrom {kind} {ref[key]['name']!r} is not rendered"
    for doc in docs:
        ns = doc["metadata"].get("namespace")
        if doc["kind"] != "Namespace" and ns != NAMESPACE:
            yield f"{doc['kind']}/{doc['metadata']['name']} is in namespace {ns!r}"


def _secret_problems(docs: list[Manifest]) -> Iterator[str]:
    for secret in of_kind(docs, "Secret"):
        values = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
        values.update(secret.get("stringData", {}))
        for key, value in values.items():
            if not all(part.startswith(PLACEHOLDER_PREFIX) for part in value.split(",")):
                yield f"Secret {secret['metadata']['name']} key {key} is not a placeholder"


def _gpu_problems(docs: list[Manifest], deployment: Manifest) -> Iterator[str]:
    pod = deployment["spec"]["template"]["spec"]
    limits = server_container(deployment).get("resources", {}).get("limits", {})
    wants_gpu = config_data(docs, deployment).get("FLORA_DEVICE", "cpu").startswith("cuda")
    has_gpu = "nvidia.com/gpu" in limits
    if wants_gpu != has_gpu:
        yield f"FLORA_DEVICE and the nvidia.com/gpu limit disagree (gpu limit: {has_gpu})"
    # A CPU torch in a GPU pod (or the reverse) starts fine and then fails or idles the GPU.
    if wants_gpu != ("cuda" in server_container(deployment)["image"].rpartition(":")[2]):
        yield "FLORA_DEVICE and the image variant (a `-cuda` tag) disagree"
    if has_gpu:
        keys = {t.get("key") for t in pod.get("tolerations", [])}
        if "nvidia.com/gpu" not in keys or not pod.get("nodeSelector"):
            yield "a GPU pod needs the nvidia.com/gpu toleration and a GPU node selector"


def overlay_problems(
    docs: list[Manifest], image_uid: int | None = None, image: Image | None = None
) -> list[str]:
    """Every invariant violation of one rendered overlay (the serving Deployment and friends;
    the routing layer, when there is one, is deploy.routing's). `image` describes the image
    (its uid wins over `image_uid`); without it the image's ENV is taken as empty and
    whether it prepared the configured model is not judged."""
    image = image or Image(uid=image_uid)
    image_uid = image.uid
    everything, docs = docs, serving(docs)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(deployment)
    problems: list[str] = []
    port_names = {p["name"] for p in container.get("ports", [])}
    problems += _probe_problems(container, port_names)
    problems += _security_problems(pod, container, image_uid)
    problems += _volume_problems(docs, pod, container)
    problems += _store_problems(docs, deployment)
    problems += _autoscaling_problems(docs, deployment)
    problems += _selector_problems(docs, deployment)
    problems += _reference_problems(everything, deployment)
    problems += _secret_problems(docs)
    problems += _gpu_problems(docs, deployment)
    env = server_environment(docs, deployment, image.env)
    problems += write_path_problems(pod, container, env, image.prepared_models)
    problems += _tenant_problems(env)
    for kind in ("requests", "limits"):
        got = container.get("resources", {}).get(kind, {})
        if not {"cpu", "memory"} <= set(got):
            problems.append(f"resources.{kind} must set cpu and memory")
    prestop, drain, grace = drain_budget(docs)
    if not grace > prestop + drain:
        problems.append(
            f"terminationGracePeriodSeconds {grace} must exceed preStop {prestop} s "
            f"+ FLORA_SHUTDOWN_TIMEOUT {drain} s"
        )
    container_port = str(container["ports"][0]["containerPort"])
    config = config_data(docs, deployment)
    if config.get("FLORA_PORT") != container_port:
        problems.append("FLORA_PORT differs from the container port")
    problems += _probe_port_problems(container, config.get("FLORA_PROBE_PORT"))
    return problems


def _probe_port_problems(container: Manifest, probe_port: str | None) -> Iterator[str]:
    """With FLORA_PROBE_PORT, every probe targets the container port of that number (the
    main port answers 503 once its connections are exhausted)."""
    if probe_port is None:
        return
    numbers = {p["name"]: str(p["containerPort"]) for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        port = container.get(probe, {}).get("httpGet", {}).get("port")
        if numbers.get(port) != probe_port:
            yield f"{probe} must use the probe port {probe_port} (FLORA_PROBE_PORT), not {port!r}"


def container_health_problems(
    probe_path: str, healthcheck: Mapping[str, str], deployment: Manifest
) -> list[str]:
    """The image's HEALTHCHECK (Docker, Compose's `service_healthy`) means what the
    Deployment's readinessProbe means: `probe_path`, the path deploy/healthcheck.py asks,
    is the readinessProbe's (a replica whose start-up failed answers /health 200 and /ready
    503 forever), and the start period covers the startupProbe's budget (its failures do
    not count while the model loads)."""
    if not healthcheck:  # dockerfile.check_dockerfile reports its absence
        return []
    container = server_container(deployment)
    problems = []
    ready = container.get("readinessProbe", {}).get("httpGet", {}).get("path")
    if probe_path != ready:
        problems.append(
            f"the HEALTHCHECK probes {probe_path!r}, the readinessProbe {ready!r}: a "
            "replica that failed to start would be healthy"
        )
    if "healthcheck.py" not in healthcheck.get("CMD", ""):
        problems.append("the HEALTHCHECK does not run deploy/healthcheck.py")
    startup = container.get("startupProbe", {})
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    start_period = duration_seconds(healthcheck.get("start-period", "0s"))
    if start_period < budget:
        problems.append(
            f"HEALTHCHECK --start-period={start_period:.0f}s is shorter than the "
            f"startupProbe's {budget} s for the model load"
        )
    return problems


_SHELLS = frozenset({"", "sh", "bash", "shell", "console"})
_DATA_FLAGS = frozenset({"-d", "--data", "--data-raw", "--data-binary", "--data-ascii"})
_SEPARATORS = frozenset({"|", "||", "&&", ";", "&"})


def shell_blocks(markdown: str) -> list[str]:
    """The text of every fenced code block in shell (```sh, bash, shell, console, or no
    language) of a Markdown page."""
    blocks: list[str] = []
    language: str | None = None  # None: outside a block
    lines: list[str] = []
    for line in markdown.splitlines():
        fence = line.strip().startswith("```")
        if fence and language is None:
            language, lines = line.strip()[3:].strip().lower(), []
        elif fence:
            if language in _SHELLS:
                blocks.append("\n".join(lines) + "\n")
            language = None
        elif language is not None:
            lines.append(line)
    return blocks


def _curl_commands(markdown: str) -> Iterator[tuple[str, list[str]]]:
    """(the command as written, its words) of every curl call in the page's shell blocks."""
    for block in shell_blocks(markdown):
        pending = ""
        for line in block.replace("\\\n", " ").splitlines():
            pending += line + "\n"
            try:  # a quoted body may span lines: read on until the quotes balance
                words = shlex.split(pending, comments=True)
            except ValueError:
                continue
            command, pending = pending, ""
            if "curl" not in words:
                continue
            call: list[str] = []
            for word in [*words, ";"]:
                if word in _SEPARATORS:
                    if call and call[0] == "curl":
                        yield " ".join(command.split()), call
                    call = []
                else:
                    call.append(word)


def curl_json_problems(markdown: str) -> list[str]:
    """curl calls in a page's code blocks that post a JSON body (`-d '{...}'`) without
    `Content-Type: application/json` (or `--json`): curl then sends
    application/x-www-form-urlencoded, and the server answers 422."""
    problems = []
    for command, words in _curl_commands(markdown):
        pairs = list(zip(words, [*words[1:], ""], strict=True))
        posts_json = any(
            (flag in _DATA_FLAGS and value.lstrip().startswith("{")) or (flag.startswith("-d{"))
            for flag, value in pairs
        )
        declares = "--json" in words or any(
            flag in {"-H", "--header"}
            and re.fullmatch(r"content-type:\s*application/json.*", value.strip(), re.I)
            for flag, value in pairs
        )
        if posts_json and not declares:
            problems.append(f"curl posts JSON without Content-Type: application/json: {command}")
    return problems


def adapter_rule_problems(config_yaml: dict[str, Any], helm_values: dict[str, Any]) -> list[str]:
    """The prometheus-adapter rule must publish QUEUE_METRIC, identically in both forms."""
    rules = config_yaml.get("rules", [])
    problems = []
    if rules != helm_values.get("rules", {}).get("custom"):
        problems.append("prometheus-adapter ConfigMap and Helm values hold different rules")
    if [r.get("name", {}).get("as") for r in rules] != [QUEUE_METRIC]:
        problems.append(f"prometheus-adapter must publish exactly {QUEUE_METRIC}")
    return problems
