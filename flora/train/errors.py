"""Errors of ``flora-train``: bad data and bad options end as one line and exit code 2."""

from __future__ import annotations


class TrainError(ValueError):
    """A problem the user can fix (options, base model); the CLI prints it as one line."""


class DataError(TrainError):
    """Unusable training data: missing file, wrong columns, unknown label, empty set,
    unreadable image, malformed JSON line."""
