"""Rendering for the `flora` command line: one-line errors, tables, JSON."""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from flora_client.errors import (
    APIError,
    FloraError,
    NotReady,
    Overloaded,
    ValidationError,
)
from flora_client.types import AdapterInfo, ClassifyResponse, ModelList


def stdout() -> Console:
    # highlight off: ids and digests must print exactly as they are.
    return Console(highlight=False, soft_wrap=True)


def stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def emit_json(value: Any, *, lines: bool = False) -> None:
    """Machine-readable output on stdout: an indented document, or with ``lines`` one
    compact JSON object per line (for commands that answer repeatedly, like chat)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    sys.stdout.write(json.dumps(value, indent=None if lines else 2) + "\n")
    sys.stdout.flush()


def describe_error(exc: BaseException) -> str:
    """One line that says what went wrong and, where the server said, what to do."""
    if isinstance(exc, APIError):
        text = f"{exc.status_code}"
        if exc.error_type:
            text += f" {exc.error_type}"
        text += f": {exc.message}"
        if isinstance(exc, ValidationError) and exc.field and exc.field not in exc.message:
            text += f" (field: {exc.field})"
        if isinstance(exc, Overloaded | NotReady) and exc.retry_after is not None:
            text += f" (retry after {exc.retry_after:g} s)"
        return text
    if isinstance(exc, FloraError):
        return str(exc)
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc) or type(exc).__name__


def print_error(exc: BaseException) -> None:
    stderr().print(f"error: {describe_error(exc)}", markup=False)


def upload_progress(enabled: bool) -> Progress:
    """A transfer bar on stderr; shown only on a terminal (pipes and logs stay clean)."""
    console = stderr()
    return Progress(
        TextColumn("uploading"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
        transient=True,
    )


def _short_digest(sha256: str | None) -> str:
    if not sha256:
        return "-"
    return sha256.removeprefix("sha256:")[:12]


def _where(info: AdapterInfo) -> str:
    if info.location:
        return info.location
    extra = info.model_extra or {}
    for key in ("status", "where", "state"):
        value = extra.get(key)
        if isinstance(value, str):
            return value
    if isinstance(extra.get("loaded"), bool):
        return "loaded" if extra["loaded"] else "stored"
    return "-"


def adapters_table(items: list[AdapterInfo], total: int | None) -> Table:
    title = f"{len(items)} adapter(s)" + (f" of {total}" if total is not None else "")
    table = Table(title=title, title_justify="left")
    table.add_column("id")
    table.add_column("size", justify="right")
    table.add_column("sha256")
    table.add_column("where")
    for info in items:
        size = "-" if info.size_bytes is None else f"{info.size_bytes:,}"
        table.add_row(info.id, size, _short_digest(info.sha256), _where(info))
    return table


def classify_table(names: list[str], response: ClassifyResponse) -> Table:
    table = Table(title_justify="left")
    table.add_column("input")
    table.add_column("rank", justify="right")
    table.add_column("label")
    table.add_column("score", justify="right")
    for name, labels in zip(names, response.results, strict=False):
        for rank, item in enumerate(labels, start=1):
            table.add_row(name if rank == 1 else "", str(rank), item.label, f"{item.score:.4f}")
    return table


def models_table(models: ModelList) -> Table:
    table = Table(title_justify="left")
    table.add_column("id")
    table.add_column("parent")
    table.add_column("status")
    for model in models.data:
        extra = model.model_extra or {}
        status = extra.get("status")
        if status is None and isinstance(extra.get("loaded"), bool):
            status = "loaded" if extra["loaded"] else "stored"
        table.add_row(model.id, model.parent or "-", str(status or "-"))
    return table
