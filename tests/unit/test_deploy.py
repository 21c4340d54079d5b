"""The deploy check (`python -m deploy.check`) passes, and the manifests keep their promises.

The full check runs once (hadolint, kustomize, kubernetes-validate, yamllint, checkov,
invariants); the other tests read the manifests it rendered, and feed broken copies to the
same checkers to show each one fails when it should.
"""

from __future__ import annotations

import base64
import copy
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy import healthcheck
from deploy.check import (
    OVERLAYS,
    doc_examples,
    docs_problems,
    image_facts,
    image_health_problems,
    repo_root,
    run_all,
    run_hadolint,
    schema_problems,
)
from deploy.crds import validate_custom_resource
from deploy.dockerfile import (
    check_dockerfile,
    copy_sources,
    duration_seconds,
    healthcheck_options,
    is_ignored,
    parse_dockerfile,
)
from deploy.invariants import (
    config_data,
    container_health_problems,
    curl_json_problems,
    drain_budget,
    of_kind,
    one,
    overlay_problems,
    server_container,
    server_environment,
    serving,
)
from deploy.writes import quantity_bytes, staging_peak_bytes, written_paths

ROOT = repo_root()
Docs = list[dict[str, Any]]

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")


@pytest.fixture(scope="module")
def check_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Any], Path]:
    out = tmp_path_factory.mktemp("rendered")
    return run_all(ROOT, checkov=True, keep=out), out


@pytest.fixture(scope="module")
def rendered(check_run: tuple[list[Any], Path]) -> dict[str, Docs]:
    _, out = check_run
    return {p.stem: list(yaml.safe_load_all(p.read_text())) for p in out.glob("*.yaml")}


@pytest.mark.slow
def test_full_check_passes_every_step(check_run: tuple[list[Any], Path]) -> None:
    results, _ = check_run
    failures = {r.name: r.problems for r in results if r.problems}
    assert failures == {}
    assert [r.name for r in results] == [
        "hadolint",
        "dockerfile",
        "kustomize",
        "kubernetes-validate",
        "yamllint",
        "invariants",
        "docs",
        "workflows",
        "checkov",
    ]


def test_every_overlay_is_rendered(rendered: dict[str, Docs]) -> None:
    assert set(rendered) == {"base", "prometheus-adapter", *OVERLAYS}


def test_drain_arithmetic_from_rendered_yaml(rendered: dict[str, Docs]) -> None:
    # (preStop sleep, FLORA_SHUTDOWN_TIMEOUT from the ConfigMap, grace period)
    assert drain_budget(rendered["cpu"]) == (10, 30.0, 60)
    assert drain_budget(rendered["gpu"]) == (10, 60.0, 90)
    for name in OVERLAYS:
        prestop, drain, grace = drain_budget(rendered[name])
        assert grace > prestop + drain, name


def test_probes_and_security_context(rendered: dict[str, Docs]) -> None:
    deployment = one(rendered["cpu"], "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(deployment)
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # Probes use the probe listener (FLORA_PROBE_PORT), which the Service does not expose.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "probe": 8001}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "probe"
    assert one(rendered["cpu"], "ConfigMap")["data"]["FLORA_PROBE_PORT"] == "8001"
    assert {p["targetPort"] for p in one(rendered["cpu"], "Service")["spec"]["ports"]} == {"http"}
    # Prometheus scrapes with a bearer token that the server reads as its metrics key.
    endpoint = one(rendered["cpu"], "ServiceMonitor")["spec"]["endpoints"][0]
    token = endpoint["authorization"]["credentials"]
    env = {e["name"]: e for e in container["env"]}
    assert env["FLORA_METRICS_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == token["name"]
    assert token["name"] in {d["metadata"]["name"] for d in of_kind(rendered["cpu"], "Secret")}
    assert one(rendered["cpu"], "ConfigMap")["data"]["FLORA_METRICS_PUBLIC"] == "false"
    # 60 x 5 s: five minutes for the model load before liveness starts.
    assert container["startupProbe"]["failureThreshold"] * 5 == 300
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/tmp"] in empty_dirs and mounts["/home/flora/.cache"] in empty_dirs
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # one replica on RWO
    scaled_out = one(rendered["s3"], "Deployment")["spec"]["strategy"]
    assert scaled_out["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}


def test_gpu_overlay_requests_a_gpu(rendered: dict[str, Docs]) -> None:
    deployment = one(rendered["gpu"], "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    resources = server_container(deployment)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    config = one(rendered["gpu"], "ConfigMap")["data"]
    assert config["FLORA_DEVICE"] == "cuda"
    assert server_container(deployment)["image"].endswith(":0.1.0-cuda")
    assert "nvidia.com/gpu" not in str(one(rendered["cpu"], "Deployment"))


def test_store_and_autoscaler_variants(rendered: dict[str, Docs]) -> None:
    # The default overlay runs on any cluster's default storage class: one replica, RWO.
    cpu = rendered["cpu"]
    assert one(cpu, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert one(cpu, "Deployment")["spec"]["replicas"] == 1
    assert of_kind(cpu, "HorizontalPodAutoscaler") == []
    assert one(rendered["base"], "PersistentVolumeClaim")["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]
    # More than one replica: the store is in S3 (s3, keda, gpu, inference-pool).
    for name in ("s3", "keda", "gpu", "inference-pool"):
        assert of_kind(rendered[name], "PersistentVolumeClaim") == [], name
        deployment = one(serving(rendered[name]), "Deployment")
        store = config_data(rendered[name], deployment)["FLORA_ADAPTER_STORE"]
        assert store.startswith("s3://"), name
    s3 = rendered["s3"]
    assert of_kind(s3, "PersistentVolumeClaim") == []
    assert one(s3, "ConfigMap")["data"]["FLORA_ADAPTER_STORE"].startswith("s3://")
    refs = [
        r["secretRef"]["name"]
        for r in server_container(one(s3, "Deployment"))["envFrom"]
        if "secretRef" in r
    ]
    assert any(name.startswith("flora-s3-credentials-") for name in refs)
    assert {
        p["port"] for rule in one(s3, "NetworkPolicy")["spec"]["egress"] for p in rule["ports"]
    } == {53, 443}
    hpa = one(rendered["s3"], "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "flora_queue_length"
    assert of_kind(rendered["keda"], "HorizontalPodAutoscaler") == []
    assert one(rendered["keda"], "ScaledObject")["spec"]["scaleTargetRef"]["name"] == "flora-serve"
    dev = rendered["dev"]
    assert of_kind(dev, "HorizontalPodAutoscaler") == [] and of_kind(dev, "ServiceMonitor") == []
    assert one(dev, "Deployment")["spec"]["replicas"] == 1
    assert server_container(one(dev, "Deployment"))["image"] == "flora-serve:dev"
    assert one(dev, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_only_placeholder_secrets_and_one_namespace(rendered: dict[str, Docs]) -> None:
    for name in OVERLAYS:
        for secret in of_kind(rendered[name], "Secret"):
            for value in secret["data"].values():
                assert base64.b64decode(value).decode().startswith("replace-me-")
        objects = [d for d in rendered[name] if d["kind"] != "Namespace"]
        namespaces = {d["metadata"].get("namespace") for d in objects}
        assert namespaces == {"flora"}, name


def test_invariants_catch_broken_manifests(rendered: dict[str, Docs]) -> None:
    assert overlay_problems(rendered["cpu"], 10001) == []
    assert overlay_problems(rendered["s3"], 10001) == []
    docs = copy.deepcopy(rendered["s3"])
    one(docs, "ConfigMap")["data"]["FLORA_SHUTDOWN_TIMEOUT"] = "55"  # 10 + 55 > 60
    secret = next(
        d for d in of_kind(docs, "Secret") if d["metadata"]["name"].startswith("flora-api-keys")
    )
    secret["data"]["FLORA_API_KEYS"] = base64.b64encode(b"sk-real-looking-key").decode()
    server_container(one(docs, "Deployment"))["livenessProbe"]["httpGet"]["path"] = "/ready"
    docs.append(copy.deepcopy(one(rendered["keda"], "ScaledObject")))
    problems = "\n".join(overlay_problems(docs, 10001))
    assert "terminationGracePeriodSeconds 60 must exceed preStop 10 s" in problems
    assert "key FLORA_API_KEYS is not a placeholder" in problems
    assert "livenessProbe must GET /health" in problems
    assert "more than one autoscaler" in problems
    probe_moved = copy.deepcopy(rendered["cpu"])
    server_container(one(probe_moved, "Deployment"))["readinessProbe"]["httpGet"]["port"] = "http"
    assert overlay_problems(probe_moved, 10001) == [
        "readinessProbe must use the probe port 8001 (FLORA_PROBE_PORT), not 'http'"
    ]
    gpu = copy.deepcopy(rendered["gpu"])
    server_container(one(gpu, "Deployment"))["image"] = "ghcr.io/flora-serve/flora-serve:0.1.0"
    assert overlay_problems(gpu, 10001) == [
        "FLORA_DEVICE and the image variant (a `-cuda` tag) disagree"
    ]
    assert "runAsUser 10001 != the image's uid 999" in "\n".join(
        overlay_problems(rendered["cpu"], 999)
    )


def test_schema_validation_is_strict_for_builtins_and_crds(rendered: dict[str, Docs]) -> None:
    deployment = copy.deepcopy(one(rendered["cpu"], "Deployment"))
    deployment["spec"]["replica"] = 2  # typo: unknown field
    assert any("replica" in p for p in schema_problems([deployment]))
    monitor = copy.deepcopy(one(rendered["cpu"], "ServiceMonitor"))
    assert validate_custom_resource(monitor) == []
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert any("intervall" in p for p in schema_problems([monitor]))
    scaled = copy.deepcopy(one(rendered["keda"], "ScaledObject"))
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 4  # KEDA wants a string
    assert any("threshold" in p for p in validate_custom_resource(scaled))
    assert validate_custom_resource({"apiVersion": "x.io/v1", "kind": "Thing"}) == [
        "no schema for custom resource x.io/v1 Thing"
    ]


def test_prometheus_adapter_rule_matches_hpa(rendered: dict[str, Docs]) -> None:
    config = yaml.safe_load(rendered["prometheus-adapter"][0]["data"]["config.yaml"])
    assert [r["name"]["as"] for r in config["rules"]] == ["flora_queue_length"]
    assert rendered["prometheus-adapter"][0]["metadata"]["namespace"] == "monitoring"


def test_dockerfile_copy_sources_exist_and_are_in_the_context() -> None:
    instructions = parse_dockerfile((ROOT / "Dockerfile").read_text())
    sources = copy_sources(instructions)
    assert sources == ["pyproject.toml", "README.md", "flora", "server", "deploy/healthcheck.py"]
    dockerignore = (ROOT / ".dockerignore").read_text()
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not is_ignored(source, dockerignore), source
    assert check_dockerfile(ROOT) == []
    keywords = [i.keyword for i in instructions]
    assert "HEALTHCHECK" in keywords and keywords[-1] == "ENTRYPOINT"


def test_dockerignore_semantics() -> None:
    rules = (ROOT / ".dockerignore").read_text()
    assert not is_ignored("flora/models/zoo.py", rules)
    assert not is_ignored("deploy/healthcheck.py", rules)
    assert is_ignored("deploy/check.py", rules)
    assert is_ignored(".venv/bin/python", rules)
    assert is_ignored("server/flora_server/__pycache__/main.cpython-311.pyc", rules)
    assert is_ignored("flora/weights/model.safetensors", rules)
    assert is_ignored("a/b", "a\n!a/c\n") and not is_ignored("a/c/d", "a\n!a/c\n")


def test_hadolint_rejects_a_bad_dockerfile(tmp_path: Path) -> None:
    (tmp_path / "deploy").mkdir()
    shutil.copy(ROOT / "deploy" / "hadolint.yaml", tmp_path / "deploy" / "hadolint.yaml")
    (tmp_path / "Dockerfile").write_text("FROM python:3.11\nRUN pip install requests\n")
    problems = "\n".join(run_hadolint(tmp_path))
    assert "DL3013" in problems  # unpinned pip install
    assert "DL3042" in problems  # pip cache kept in the layer


def test_docs_have_a_valid_inference_pool() -> None:
    examples = doc_examples((ROOT / "docs" / "deploy.md").read_text())
    pool = next(d for d in examples if d.get("kind") == "InferencePool")
    assert pool["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "flora-serve"}
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert validate_custom_resource(pool) == []


def test_configmap_values_are_valid_server_settings(
    rendered: dict[str, Docs], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings_module = pytest.importorskip("flora_server.settings")
    for name in ("cpu", "gpu", "dev"):
        data = one(rendered[name], "ConfigMap")["data"]
        fields = set(settings_module.Settings.model_fields)
        flora_keys = {k for k in data if k.startswith("FLORA_")}
        assert set(data) - flora_keys <= {"AWS_DEFAULT_REGION"}, name  # read by boto3
        assert {k.removeprefix("FLORA_").lower() for k in flora_keys} <= fields, name
        for key, value in data.items():
            monkeypatch.setenv(key, value)
        settings = settings_module.Settings()
        assert settings.port == 8000
        assert settings.device == data["FLORA_DEVICE"]
        assert settings.shutdown_timeout == float(data["FLORA_SHUTDOWN_TIMEOUT"])


@pytest.fixture
def health_server() -> Iterator[tuple[int, list[int]]]:
    status = [200]  # /ready's; /health is always 200, as on a replica whose start-up failed

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = {"/ready": status[0], "/health": 200}.get(self.path, 404)
            self.send_response(code)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], status
    server.shutdown()
    server.server_close()


def test_healthcheck_follows_ready_status(
    health_server: tuple[int, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, status = health_server
    monkeypatch.setenv("FLORA_PORT", str(port))
    assert healthcheck.probe_url({"FLORA_PORT": str(port)}) == f"http://127.0.0.1:{port}/ready"
    both = {"FLORA_PORT": "8000", "FLORA_PROBE_PORT": "8001"}
    assert healthcheck.probe_url(both) == "http://127.0.0.1:8001/ready"
    assert healthcheck.main() == 0
    status[0] = 503  # alive (/health 200) but not ready: unhealthy
    assert healthcheck.main() == 1
    assert healthcheck.probe(f"http://127.0.0.1:{port}/health") is True
    assert healthcheck.probe(f"http://127.0.0.1:{port}/nothing") is False


def test_image_healthcheck_means_ready(rendered: dict[str, Docs]) -> None:
    assert image_health_problems(ROOT, rendered["base"]) == []
    instructions = parse_dockerfile((ROOT / "Dockerfile").read_text())
    options = healthcheck_options(instructions)
    assert options["CMD"] == '["python", "/opt/flora/healthcheck.py"]'
    assert duration_seconds(options["start-period"]) == 300
    deployment = one(rendered["base"], "Deployment")
    # The old image: /health with a 120 s start period.
    old = {**options, "start-period": "120s"}
    assert container_health_problems("/health", old, deployment) == [
        "the HEALTHCHECK probes '/health', the readinessProbe '/ready': a replica that "
        "failed to start would be healthy",
        "HEALTHCHECK --start-period=120s is shorter than the startupProbe's 300 s for the "
        "model load",
    ]
    other = {**options, "CMD": '["curl", "-f", "localhost:8000/ready"]'}
    assert container_health_problems("/ready", other, deployment) == [
        "the HEALTHCHECK does not run deploy/healthcheck.py"
    ]
    # No HEALTHCHECK at all is check_dockerfile's to report, once.
    assert container_health_problems("/ready", {}, deployment) == []
    assert duration_seconds("1m30s") == 90 and duration_seconds("500ms") == 0.5
    with pytest.raises(ValueError):
        duration_seconds("5 minutes")


def test_image_facts_from_the_dockerfile() -> None:
    image = image_facts(ROOT)
    assert image.uid == 10001
    assert image.env["FLORA_HOME"] == "/opt/flora/home"
    assert image.env["NUMBA_CACHE_DIR"] == "/home/flora/.cache/numba"
    assert image.prepared_models == frozenset({"smollm2-135m-instruct"})


def test_every_written_path_is_on_a_writable_volume(rendered: dict[str, Docs]) -> None:
    image = image_facts(ROOT)
    for name in OVERLAYS:
        assert overlay_problems(rendered[name], image=image) == [], name
    s3 = rendered["s3"]
    env = server_environment(s3, one(s3, "Deployment"), image.env)
    paths = written_paths(env, image.prepared_models)
    assert paths == {
        "/opt/flora/home/s3-scratch": "the S3 store's scratch and upload staging",
        "/tmp": "temporary files",
        "/home/flora/.cache/huggingface": "HF_HOME",
        "/home/flora/.cache": "XDG_CACHE_HOME",
        "/home/flora/.cache/numba": "NUMBA_CACHE_DIR",
        "/home/flora/.cache/triton": "TRITON_CACHE_DIR",
        "/tmp/matplotlib": "MPLCONFIGDIR",
    }
    assert staging_peak_bytes(env) == 2 * 1024**3 + 2 * 256 * 1024**2
    cpu = rendered["cpu"]
    cpu_env = server_environment(cpu, one(cpu, "Deployment"), image.env)
    assert "/var/lib/flora/adapters" in written_paths(cpu_env, image.prepared_models)

    # The old s3-store component: nothing mounted at the scratch directory.
    old = copy.deepcopy(s3)
    pod = one(old, "Deployment")["spec"]["template"]["spec"]
    container = server_container(one(old, "Deployment"))
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "s3-scratch"]
    pod["volumes"] = [v for v in pod["volumes"] if v["name"] != "s3-scratch"]
    assert overlay_problems(old, image=image) == [
        "/opt/flora/home/s3-scratch (the S3 store's scratch and upload staging) is on the "
        "read-only root filesystem, not a writable volume mount"
    ]
    # Too small for the staging peak; too large for the pod's ephemeral-storage limit.
    small = copy.deepcopy(s3)
    scratch = _volume(small, "s3-scratch")
    scratch["emptyDir"]["sizeLimit"] = "1Gi"
    assert "under the staging peak of 2684354560 bytes" in "\n".join(
        overlay_problems(small, image=image)
    )
    scratch["emptyDir"]["sizeLimit"] = "6Gi"  # 1 + 2 + 6 GiB > 8 GiB
    assert overlay_problems(small, image=image) == [
        "the emptyDir sizeLimits (6Gi + 1Gi + 2Gi) exceed the ephemeral-storage limit (8Gi): "
        "the kubelet would evict the pod first"
    ]
    del _volume(small, "tmp")["emptyDir"]["sizeLimit"]
    scratch["emptyDir"]["sizeLimit"] = "4Gi"
    assert overlay_problems(small, image=image) == [
        "the emptyDir sizeLimits (4Gi + none + 2Gi) exceed the ephemeral-storage limit (8Gi): "
        "the kubelet would evict the pod first"
    ]
    # A read-only mount, or a configMap volume, is no place to write.
    read_only = copy.deepcopy(s3)
    mounts = server_container(one(read_only, "Deployment"))["volumeMounts"]
    next(m for m in mounts if m["name"] == "s3-scratch")["readOnly"] = True
    assert "is on volume 's3-scratch', not a writable" in "\n".join(
        overlay_problems(read_only, image=image)
    )
    # A zoo model the image did not prepare is converted into FLORA_HOME at start-up.
    other = copy.deepcopy(cpu)
    one(other, "ConfigMap")["data"]["FLORA_MODEL"] = "minilm-l6"
    assert overlay_problems(other, image=image) == [
        "/opt/flora/home/models (the conversion of minilm-l6 (not in the image)) is on the "
        "read-only root filesystem, not a writable volume mount"
    ]


def test_written_paths_follow_the_server_settings(
    rendered: dict[str, Docs], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings_module = pytest.importorskip("flora_server.settings")
    image = image_facts(ROOT)
    for name in OVERLAYS:
        docs = serving(rendered[name])
        env = server_environment(docs, one(docs, "Deployment"), image.env)
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            settings = settings_module.Settings()
        # The store directory (local) or the S3 scratch directory, as the server derives it.
        assert str(settings.adapter_store_dir) in written_paths(env, image.prepared_models), name


def _volume(docs: Docs, name: str) -> dict[str, Any]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    return next(v for v in pod["volumes"] if v["name"] == name)


def test_quantities() -> None:
    assert quantity_bytes("4Gi") == 4 * 1024**3
    assert quantity_bytes("512Mi") == 512 * 1024**2
    assert quantity_bytes("1G") == 1e9 and quantity_bytes("2k") == 2000
    assert quantity_bytes("1Ti") == 1024**4
    assert quantity_bytes(1024) == 1024
    with pytest.raises(ValueError):
        quantity_bytes("4 GiB")


def test_docs_curl_calls_that_post_json_say_so() -> None:
    assert curl_json_problems((ROOT / "docs" / "deploy.md").read_text()) == []
    page = """
```sh
curl -s localhost:8000/generate -H 'X-Request-Id: a' \\
  -d '{"inputs": "Hi"}'
curl -s localhost:8000/generate -H 'content-type: application/json' -d '{
  "inputs": "Hi"}'
curl -s localhost:8000/generate --json '{"inputs": "Hi"}'
curl -s localhost:8000/v1/adapters -F adapter_id=x -F archive=@x.flora
KEY=x curl -s localhost:8000/health && curl -s localhost:8000/v1/completions --data "{}"
```

```python
print("curl -d '{}' in another language is not a shell call")
```
"""
    assert curl_json_problems(page) == [
        "curl posts JSON without Content-Type: application/json: "
        "curl -s localhost:8000/generate -H 'X-Request-Id: a' -d '{\"inputs\": \"Hi\"}'",
        "curl posts JSON without Content-Type: application/json: KEY=x curl -s "
        'localhost:8000/health && curl -s localhost:8000/v1/completions --data "{}"',
    ]
    assert docs_problems(ROOT) == []
