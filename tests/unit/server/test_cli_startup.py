"""`flora-serve` start-up: whatever stops it before it listens is one line on stderr that
names the flag and its env variable, and exit status 2; a misspelled FLORA_ variable is
refused, and the FLORA_ variables that are no setting but belong there are not."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import pytest

from flora_server import lifecycle, observability
from flora_server.cli import (
    OTHER_FLORA_ENV,
    EnvironmentCheck,
    check_environment,
    main,
    startup_error,
)
from flora_server.settings import Settings

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def start(monkeypatch, tmp_path):
    """`run(argv, **env)` runs `flora-serve` up to the point it would listen, in an
    environment holding only `env` of the FLORA_ variables. Returns the settings it would
    serve, or the SystemExit code."""
    served: list[Settings] = []

    def fake_serve(app, settings):  # type: ignore[no-untyped-def]
        served.append(settings)
        return 0

    monkeypatch.setattr(lifecycle, "serve", fake_serve)
    monkeypatch.setattr(observability, "configure_logging", lambda level, fmt: None)

    def run(argv: list[str], **env: str) -> Settings | int:
        served.clear()
        for name in list(os.environ):
            if name.upper().startswith("FLORA_"):
                monkeypatch.delenv(name)
        monkeypatch.setenv("FLORA_HOME", str(tmp_path / "home"))
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        try:
            main(argv)
        except SystemExit as exc:
            assert not served
            return int(exc.code or 0)
        (settings,) = served
        return settings

    return run


def stderr_line(capsys) -> str:
    """The single line `flora-serve` wrote to stderr, less its prefix."""
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("flora-serve: ")
    return lines[0].removeprefix("flora-serve: ")


@pytest.mark.parametrize(
    "argv, env",
    [
        (["--host", ""], {}),
        (["--host", "  "], {}),
        ([], {"FLORA_HOST": ""}),
    ],
)
def test_an_empty_host_is_refused(start, capsys, argv, env):
    assert start(argv, **env) == 2
    assert stderr_line(capsys).startswith("--host / FLORA_HOST: must not be empty")


@pytest.mark.parametrize(
    "name, meant",
    [
        ("FLORA_API_KEY", "FLORA_API_KEYS"),
        ("FLORA_ADMIN_KEY", "FLORA_ADMIN_KEYS"),
        ("FLORA_METRICS_KEY", "FLORA_METRICS_KEYS"),
        ("FLORA_PROT", "FLORA_PORT"),
        ("flora_api_key", "FLORA_API_KEYS"),  # read case-insensitively, like the settings
        ("FLORA_LORA_DIR", "FLORA_LORA_DIRS"),
    ],
)
def test_a_misspelled_setting_stops_the_server(start, capsys, name, meant):
    assert start([], **{name: "secret"}) == 2
    line = stderr_line(capsys)
    assert line.startswith(f"{name} is not a setting; did you mean {meant}?")
    # the client's own variable says so, for a shell that set it for the client
    client = name.upper() == "FLORA_API_KEY"
    assert ("the flora client's key" in line) == client, line


K8S_SERVICE_LINKS = {
    # A Service named "flora-serve" ...
    "FLORA_SERVE_SERVICE_HOST": "10.0.0.7",
    "FLORA_SERVE_SERVICE_PORT": "8000",
    "FLORA_SERVE_SERVICE_PORT_HTTP": "8000",
    "FLORA_SERVE_PORT": "tcp://10.0.0.7:8000",
    "FLORA_SERVE_PORT_8000_TCP": "tcp://10.0.0.7:8000",
    "FLORA_SERVE_PORT_8000_TCP_PROTO": "tcp",
    "FLORA_SERVE_PORT_8000_TCP_PORT": "8000",
    "FLORA_SERVE_PORT_8000_TCP_ADDR": "10.0.0.7",
    # ... and one named "flora", whose FLORA_PORT takes a setting's name.
    "FLORA_SERVICE_HOST": "10.0.0.8",
    "FLORA_SERVICE_PORT": "9000",
    "FLORA_PORT": "tcp://10.0.0.8:9000",
    "FLORA_PORT_9000_TCP": "tcp://10.0.0.8:9000",
    "FLORA_PORT_9000_TCP_ADDR": "10.0.0.8",
    # ... and one named "flora-probe", whose FLORA_PROBE_PORT does too.
    "FLORA_PROBE_PORT": "tcp://10.0.0.9:8001",
}


def test_kubernetes_service_links_never_stop_the_server(start, capsys, caplog):
    caplog.set_level(logging.WARNING, logger="flora_server")
    settings = start([], **K8S_SERVICE_LINKS)
    assert isinstance(settings, Settings), capsys.readouterr().err
    assert settings.port == 8000 and settings.probe_port is None  # the links are not ports
    assert start(["--port", "9100"], **K8S_SERVICE_LINKS).port == 9100  # type: ignore[union-attr]
    warned = [r.getMessage() for r in caplog.records if "FLORA_" in r.getMessage()]
    warned = [w for w in warned if not w.startswith("no API keys")]
    # Only the links that take a setting's name are mentioned; the others pass in silence.
    assert sorted({w.split("=")[0] for w in warned}) == ["FLORA_PORT", "FLORA_PROBE_PORT"]
    assert any(
        w.startswith("FLORA_PORT=tcp://10.0.0.8:9000 looks like a Kubernetes service link")
        for w in warned
    ), warned


def test_an_unknown_flora_variable_is_a_warning(start, caplog):
    caplog.set_level(logging.WARNING, logger="flora_server")
    assert isinstance(start([], FLORA_VERBOSE="1", FLORA_MODEL_NAME="x"), Settings)
    messages = [r.getMessage() for r in caplog.records]
    assert "FLORA_VERBOSE is not a setting (ignored)" in messages
    assert (
        "FLORA_MODEL_NAME is not a setting (ignored); did you mean FLORA_SERVED_MODEL_NAME?"
        in messages
    )


def _flora_variables_in_the_repo() -> set[str]:
    """Every FLORA_ name the code, the tests (but this file's misspellings) and the
    deployment files mention."""
    quoted = re.compile(r"[\"'](FLORA_[A-Z0-9_]+)[\"']")
    assigned = re.compile(r"^\s*(?:-\s*|ARG\s+|ENV\s+)?(FLORA_[A-Z0-9_]+)\s*[=:]", re.M)
    names: set[str] = set()
    for folder in ("server", "flora", "clients", "bench", "deploy", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if path != Path(__file__).resolve():
                names |= set(quoted.findall(path.read_text()))
    deploy_files = [ROOT / "Dockerfile", ROOT / "docker-compose.yml", ROOT / "Makefile"]
    deploy_files += [p for p in (ROOT / "deploy").rglob("*") if p.suffix in {".env", ".yaml"}]
    for path in deploy_files:
        if path.is_file():
            names |= set(assigned.findall(path.read_text()))
    return names


def test_every_flora_variable_the_repo_uses_passes_in_silence():
    """A FLORA_ variable read outside Settings (the client's URL, the Triton switch, the
    crash hook, the image's uid) must not be refused or warned about. FLORA_API_KEY, the
    client's key, is refused on purpose: it is one letter from FLORA_API_KEYS."""
    names = _flora_variables_in_the_repo()
    assert OTHER_FLORA_ENV | {"FLORA_API_KEY", "FLORA_HOME", "FLORA_PORT"} <= names
    for name in sorted(names - {"FLORA_API_KEY"}):
        assert check_environment({name: "1"}) == EnvironmentCheck(), name
    [refused] = check_environment({"FLORA_API_KEY": "1"}).refused
    assert refused.startswith("FLORA_API_KEY is not a setting; did you mean FLORA_API_KEYS?")


@pytest.mark.parametrize(
    "argv, env, line",
    [
        (
            ["--probe-port", "8000"],
            {},
            "probe_port must differ from port (--probe-port / FLORA_PROBE_PORT; "
            "--port / FLORA_PORT)",
        ),
        (
            ["--api-key", "a", "--admin-key", "a"],
            {},
            "a key is listed twice, or as two kinds of key (--api-key / FLORA_API_KEYS; "
            "--admin-key / FLORA_ADMIN_KEYS; --metrics-key / FLORA_METRICS_KEYS)",
        ),
        (
            [],
            {"FLORA_API_KEYS": "[bad"},
            "--api-key / FLORA_API_KEYS: a value starting with [ must be a JSON list: "
            "Expecting value: line 1 column 2 (char 1)",
        ),
        (
            [],
            {"FLORA_FACTOR_DTYPE": "x"},
            "--factor-dtype / FLORA_FACTOR_DTYPE or FLORA_ADAPTER_DTYPE: "
            "Input should be 'auto', 'float32' or 'bfloat16'",
        ),
        (
            ["--factor-dtype", "x"],
            {},
            "--factor-dtype / FLORA_FACTOR_DTYPE or FLORA_ADAPTER_DTYPE: "
            "Input should be 'auto', 'float32' or 'bfloat16'",
        ),
        (
            [],
            {"FLORA_MAX_QUEUE": "0"},
            "--max-queue / FLORA_MAX_QUEUE: Input should be greater than or equal to 1",
        ),
    ],
)
def test_errors_name_the_real_flag_and_its_env_variable(start, capsys, argv, env, line):
    assert start(argv, **env) == 2
    assert stderr_line(capsys) == line


def test_a_store_path_that_is_a_file_is_one_line(start, capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert start(["--adapter-store", str(afile)]) == 2
    assert stderr_line(capsys) == (
        f"--adapter-store / FLORA_ADAPTER_STORE: {str(afile)!r} is not a directory"
    )
    assert start(["--home", str(afile / "sub")]) == 2
    assert stderr_line(capsys) == (
        f"--home / FLORA_HOME: {str(afile / 'sub')!r} is inside a file, {afile}"
    )


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux procfs")
def test_a_store_directory_that_cannot_be_made_is_one_line(start, capsys):
    """/proc takes no new directory, even from root: the failure comes from create_app."""
    assert start(["--adapter-store", "/proc/flora-no-such-dir"]) == 2
    assert stderr_line(capsys) == (
        "--adapter-store / FLORA_ADAPTER_STORE: cannot use /proc/flora-no-such-dir: "
        "No such file or directory"
    )


def test_startup_error_names_the_setting_only_for_its_own_causes(tmp_path):
    settings = Settings(home=tmp_path / "home")
    denied = PermissionError(13, "Permission denied", str(tmp_path / "home"))
    assert startup_error(denied, settings) == (
        f"--home / FLORA_HOME: cannot use {tmp_path / 'home'}: Permission denied"
    )
    elsewhere = PermissionError(13, "Permission denied", "/etc/some-other-file")
    assert startup_error(elsewhere, settings) is None  # not the store's: traceback kept
    assert startup_error(RuntimeError("a bug"), settings) is None


def test_otel_endpoint_without_the_extra_is_one_line(start, capsys, monkeypatch):
    # None in sys.modules makes the import raise ImportError, as without the extra.
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    assert start(["--otel-endpoint", "http://collector:4318/v1/traces"]) == 2
    line = stderr_line(capsys)
    assert line.startswith(
        "--otel-endpoint / FLORA_OTEL_ENDPOINT: OpenTelemetry is not installed "
        "(pip install 'flora-serve[otel]'): "
    ), line
