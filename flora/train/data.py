"""Training data from files: labelled text (CSV/JSONL), images (folder per class or CSV),
chat JSONL; stratified eval splits; label encoding.

Every problem a user can fix is a :class:`DataError` whose message names the file (and
the line), so the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image, UnidentifiedImageError

from flora.train.errors import DataError

T = TypeVar("T")

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
Message = dict[str, str]


@dataclass
class Splits:
    """Train and eval examples; ``eval`` is None when the source has no fixed split."""

    train: list[Any]
    eval: list[Any] | None = None


def _existing(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data file not found: {p}")
    return p


def _rows(path: Path, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a CSV (header row) or JSONL file, each with at least ``columns``."""
    suffix = path.suffix.lower()
    rows: list[dict[str, Any]] = []
    if suffix in {".jsonl", ".json"}:
        for lineno, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object")
            missing = [c for c in columns if c not in row]
            if missing:
                raise DataError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
            rows.append(row)
    elif suffix in {".csv", ".tsv"}:
        reader = csv.DictReader(
            _read_text(path).splitlines(), delimiter="\t" if suffix == ".tsv" else ","
        )
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataError(
                f"{path}: wrong columns: need {', '.join(columns)}, "
                f"found {', '.join(header) or 'none'}"
            )
        for lineno, row in enumerate(reader, 2):
            if any(row.get(c) is None for c in columns):
                raise DataError(f"{path}:{lineno}: row has too few columns")
            rows.append(row)
    else:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use .csv or .jsonl")
    if not rows:
        raise DataError(f"{path}: no examples (empty data set)")
    return rows


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a .csv or .jsonl file") from None


def load_text_labels(path: str | Path) -> list[tuple[str, str]]:
    """``(text, label)`` pairs from a CSV with columns ``text,label`` or JSONL objects
    with fields ``text`` and ``label``."""
    p = _existing(path)
    out = []
    for row in _rows(p, ("text", "label")):
        text, label = row["text"], row["label"]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{p}: every text must be a non-empty string")
        if isinstance(label, bool) or not isinstance(label, str | int):
            raise DataError(f"{p}: every label must be a string or an integer")
        out.append((text, str(label)))
    return out


def load_image_labels(path: str | Path) -> list[tuple[Image.Image, str]]:
    """``(RGB image, label)`` pairs from a folder with one sub-folder per class, or a CSV
    with columns ``path,label`` (relative paths are relative to the CSV). Every image is
    decoded here, so an unreadable file fails before training starts."""
    p = _existing(path)
    if p.is_dir():
        items = [
            (f, d.name)
            for d in sorted(q for q in p.iterdir() if q.is_dir())
            for f in sorted(d.iterdir())
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not items:
            raise DataError(f"{p}: no images (expected one sub-folder of images per class)")
    else:
        items = [(p.parent / str(r["path"]), str(r["label"])) for r in _rows(p, ("path", "label"))]
    return [(read_image(f), label) for f, label in items]


def read_image(path: Path) -> Image.Image:
    """Decode one image to RGB; DataError if missing or unreadable."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"unreadable image {path}: {exc}") from None


def load_chats(path: str | Path) -> list[list[Message]]:
    """Conversations from JSONL: ``{"messages": [{"role", "content"}, ...]}`` or
    ``{"prompt", "completion"}`` (a user turn and an assistant turn). The last message of
    each conversation must be the assistant's (that is what the loss is on)."""
    p = _existing(path)
    if p.suffix.lower() not in {".jsonl", ".json"}:
        raise DataError(f"{p}: chat data must be JSONL (.jsonl)")
    chats: list[list[Message]] = []
    for i, row in enumerate(_rows(p, ()), 1):
        if "messages" in row:
            messages = row["messages"]
        elif "prompt" in row and "completion" in row:
            messages = [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["completion"]},
            ]
        else:
            raise DataError(f"{p}: example {i} needs 'messages' or 'prompt' and 'completion'")
        chats.append(check_chat(messages, f"{p}: example {i}"))
    return chats


def check_chat(messages: Any, where: str) -> list[Message]:
    """Validate one conversation (roles, string contents, ends with the assistant)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: messages must be a non-empty list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs a string 'content'")
        if m.get("role") not in {"system", "user", "assistant"}:
            raise DataError(f"{where}: role must be system, user or assistant")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's answer")
    return out


def stratified_split(
    items: Sequence[T], key: Callable[[T], str], fraction: float, seed: int
) -> tuple[list[T], list[T]]:
    """Hold out ``round(fraction * n_c)`` items of each class c (at least one item of a
    class stays in train), chosen by a seeded shuffle; order within each side is kept."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"--eval-split fraction must be in (0, 1), got {fraction}")
    by_class: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_class.setdefault(key(item), []).append(i)
    rng = random.Random(seed)
    held: set[int] = set()
    for idx in by_class.values():
        k = min(round(fraction * len(idx)), len(idx) - 1)
        held.update(rng.sample(idx, k))
    train = [x for i, x in enumerate(items) if i not in held]
    eval_ = [x for i, x in enumerate(items) if i in held]
    return train, eval_


def encode_labels(
    train: Sequence[tuple[Any, str]], eval_: Sequence[tuple[Any, str]], where: str
) -> tuple[list[tuple[Any, int]], list[tuple[Any, int]], list[str]]:
    """Map label names to ids (sorted names; numeric names sorted as numbers).

    DataError if a set is empty, there are fewer than two classes, or an eval label never
    occurs in training."""
    if not train:
        raise DataError(f"{where}: the training set is empty")
    if not eval_:
        raise DataError(f"{where}: the eval set is empty")
    names = sorted({lab for _, lab in train}, key=_label_order)
    if len(names) < 2:
        raise DataError(f"{where}: need at least two classes, found {names}")
    ids = {n: i for i, n in enumerate(names)}
    unknown = sorted({lab for _, lab in eval_ if lab not in ids}, key=_label_order)
    if unknown:
        raise DataError(f"{where}: unknown label in eval: {unknown[0]!r} never occurs in training")
    return (
        [(x, ids[lab]) for x, lab in train],
        [(x, ids[lab]) for x, lab in eval_],
        names,
    )


def _label_order(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.lstrip("-").isdigit() else (1, name)


def parse_eval_split(value: str | None) -> float | str | None:
    """``--eval-split``: a fraction (``"0.1"``) or the spec of an eval file."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return value
