"""`flora-serve`: every `Settings` field is a flag (`--max-queue 64`); env `FLORA_*` fills
the rest. `--adapter DIR` / `--adapter NAME=DIR` repeats; booleans take `--x/--no-x`."""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from flora_server.settings import Settings

# Flags whose name differs from the field (the field is a list, the flag is singular).
_FLAG_NAMES = {
    "adapters": "adapter",
    "api_keys": "api-key",
    "admin_keys": "admin-key",
    "metrics_keys": "metrics-key",
}

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
        flag = "--" + _FLAG_NAMES.get(name, name.replace("_", "-"))
        default = info.get_default(call_default_factory=True)
        help_text = f"{info.description or ''} (env FLORA_{name.upper()}; default {default})"
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


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `flora-serve` console script."""
    try:
        settings = parse_settings(argv)
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            print(f"flora-serve: --{field.replace('_', '-')}: {err['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
    from flora_server.auth import startup_warnings
    from flora_server.lifecycle import serve
    from flora_server.main import create_app
    from flora_server.observability import configure_logging

    configure_logging(settings.log_level, settings.log_format)

    for warning in startup_warnings(settings.api_keys, settings.admin_keys, settings.host):
        logging.getLogger("flora_server").warning(warning)
    app = create_app(settings)
    code = serve(app, settings)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":  # pragma: no cover
    main()

__all__ = ["build_parser", "main", "parse_settings"]
