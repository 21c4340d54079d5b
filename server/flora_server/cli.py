"""`flora-serve`: every `Settings` field is a flag (`--max-queue 64`); env `FLORA_*` fills
the rest. `--adapter DIR` / `--adapter NAME=DIR` repeats; booleans take `--x/--no-x`.

Whatever stops the start before the server listens (an invalid setting, a misspelled
FLORA_ variable, a store directory that cannot be made, a missing optional extra) is one
line on stderr naming the setting, and exit status 2."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from flora_server.settings import (
    ENV_PREFIX,
    Settings,
    env_names,
    flag_name,
    is_service_link,
    setting_label,
)

# Older flag names still accepted (hidden from --help).
_OLD_FLAGS = {"factor_dtype": "--adapter-dtype"}


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return typing.get_origin(annotation) is list


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def build_parser() -> argparse.ArgumentParser:
    """A parser with one flag per `Settings` field, defaults left unset (None) so only the
    flags actually given override the environment."""
    parser = argparse.ArgumentParser(
        prog="flora-serve",
        description="Serve many FLoRA adapters on one base model (env: FLORA_<FIELD>).",
    )
    for name, info in Settings.model_fields.items():
        flag = flag_name(name)
        default = info.get_default(call_default_factory=True)
        help_text = f"{info.description or ''} (env {env_names(name)[0]}; default {default})"
        if _is_bool(info.annotation):
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif _is_list(info.annotation):
            parser.add_argument(flag, dest=name, action="append", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=None, help=help_text)
    for name, old in _OLD_FLAGS.items():
        parser.add_argument(old, dest=name, default=None, help=argparse.SUPPRESS)
    return parser


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    """Settings from the environment overlaid with the flags in `argv`."""
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**overrides)


# FLORA_ variables read outside Settings: the client's server address (flora_client; the
# docs test sets it for the commands it runs), the Triton kill switch
# (flora.serving.backends.triton_gpu), the crash hook of the store tests
# (flora_server.adapters.store.CRASH_ENV) and the image's build argument (Dockerfile).
# FLORA_API_KEY, the client's key, is not one of them: one letter from FLORA_API_KEYS, in a
# server's environment it is the likeliest typo for a key that would leave the server open,
# so it is refused like any near miss.
OTHER_FLORA_ENV = frozenset({"FLORA_URL", "FLORA_TRITON", "FLORA_TEST_CRASH_AT", "FLORA_UID"})

# The flora client's own variables that are near misses of a setting: the refusal says so,
# for a shell that set one for the client.
_CLIENT_ENV = {
    "FLORA_API_KEY": " (FLORA_API_KEY is the flora client's key; unset it to start this "
    "server without keys)"
}

# A name (less FLORA_) this alike to a setting's (difflib ratio) is taken for a misspelling
# of it and refused: FLORA_PROT to FLORA_PORT is 0.75. A weaker likeness only adds the
# suggestion to the warning.
NEAR_MISS_RATIO = 0.75
_SUGGEST_RATIO = 0.6


@dataclass(frozen=True)
class EnvironmentCheck:
    """What `check_environment` found: `refused` stops the server, `warnings` are logged."""

    refused: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_environment(environ: Mapping[str, str]) -> EnvironmentCheck:
    """FLORA_ variables in `environ` that are no setting. A near miss of a setting's name
    (FLORA_API_KEY for FLORA_API_KEYS) is refused: the setting it was meant to be would be
    silently unset. Service links and the variables read elsewhere pass; any other one is
    warned about."""
    known = {env: f for f in Settings.model_fields for env in env_names(f)}
    suffixes = {env.removeprefix(ENV_PREFIX).lower(): env for env in known}
    check = EnvironmentCheck()
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in OTHER_FLORA_ENV:
            continue
        if upper in known:
            if is_service_link(name, environ[name]):
                check.warnings.append(
                    f"{name}={environ[name]} looks like a Kubernetes service link, not a "
                    f"port: ignored ({setting_label(known[upper])} keeps its flag or default)"
                )
            continue
        if is_service_link(name, environ[name]):
            continue
        suffix = upper.removeprefix(ENV_PREFIX).lower()
        ratio, best = max(
            (difflib.SequenceMatcher(None, suffix, candidate).ratio(), env)
            for candidate, env in suffixes.items()
        )
        if ratio >= NEAR_MISS_RATIO:
            hint = _CLIENT_ENV.get(upper, "")
            check.refused.append(f"{name} is not a setting; did you mean {best}?{hint}")
        elif ratio >= _SUGGEST_RATIO:
            check.warnings.append(f"{name} is not a setting (ignored); did you mean {best}?")
        else:
            check.warnings.append(f"{name} is not a setting (ignored)")
    return check


def error_line(err: Mapping[str, Any]) -> str:
    """One validation error as `--flag / FLORA_ENV: message`; a rule joining several
    settings (no `loc`) names them in its message."""
    message = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:
        return message
    return f"{setting_label(str(err['loc'][0]))}: {message}"


def startup_error(exc: BaseException, settings: Settings) -> str | None:
    """The one-line cause of a failure to build the app, naming the setting, or None for a
    failure no setting explains (a bug: its traceback is kept)."""
    if isinstance(exc, OSError) and exc.filename is not None:
        # Building the app makes the adapter store directory (or the S3 scratch directory).
        path, store = Path(exc.filename), settings.adapter_store_dir
        if path.is_relative_to(store) or store.is_relative_to(path):
            local_store = settings.adapter_store is not None and settings.adapter_store_url is None
            label = setting_label("adapter_store" if local_store else "home")
            return f"{label}: cannot use {path}: {exc.strerror or exc}"
    cause = exc if isinstance(exc, ImportError) else exc.__cause__
    if settings.otel_endpoint and isinstance(cause, ImportError):
        return (
            f"{setting_label('otel_endpoint')}: OpenTelemetry is not installed "
            f"(pip install 'flora-serve[otel]'): {cause}"
        )
    return None


def _exit(lines: Sequence[str]) -> NoReturn:
    for line in lines:
        print(f"flora-serve: {line}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `flora-serve` console script."""
    environment = check_environment(os.environ)
    try:
        settings = parse_settings(argv)  # --help exits here, whatever the environment
    except ValidationError as exc:
        _exit(environment.refused + [error_line(err) for err in exc.errors()])
    if environment.refused:
        _exit(environment.refused)
    from flora_server.auth import startup_warnings
    from flora_server.lifecycle import serve
    from flora_server.main import create_app
    from flora_server.observability import configure_logging

    configure_logging(settings.log_level, settings.log_format)

    log = logging.getLogger("flora_server")
    for warning in environment.warnings:
        log.warning(warning)
    for warning in startup_warnings(settings.api_keys, settings.admin_keys, settings.host):
        log.warning(warning)
    try:
        app = create_app(settings)
    except (OSError, ImportError, RuntimeError) as exc:
        line = startup_error(exc, settings)
        if line is None:
            raise
        _exit([line])
    code = serve(app, settings)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":  # pragma: no cover
    main()

__all__ = [
    "EnvironmentCheck",
    "build_parser",
    "check_environment",
    "error_line",
    "main",
    "parse_settings",
    "startup_error",
]
