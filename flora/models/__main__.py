"""``python -m flora.models list`` / ``python -m flora.models prepare NAME [--home DIR]``."""

from __future__ import annotations

import argparse
import logging
import sys

from flora.models.catalog import embedded_models
from flora.models.errors import ModelError
from flora.models.storage import home as resolve_home
from flora.models.storage import models_dir
from flora.models.zoo import prepare


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m flora.models", description=__doc__)
    parser.add_argument(
        "--home", default=None, help="FLORA_HOME (default: $FLORA_HOME or ~/.cache/flora)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list embedded models and whether they are converted")
    prep = sub.add_parser("prepare", help="convert embedded models once into FLORA_HOME")
    prep.add_argument("names", nargs="+", metavar="NAME", help="model name, or 'all'")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    registry = embedded_models()
    if args.command == "list":
        root = models_dir(resolve_home(args.home))
        for spec in registry:
            state = "prepared" if (root / spec.name / "flora_model.json").is_file() else "-"
            print(f"{spec.name:24} {spec.kind:17} {state:9} {spec.description}")
        return 0
    names = registry.names() if args.names == ["all"] else args.names
    for name in names:
        try:
            print(prepare(name, args.home, registry=registry))
        except ModelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
