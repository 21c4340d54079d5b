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


Columns = dict[str, str]
"""Column mapping: role (``text``, ``label``, ``image``, ...) -> the column holding it."""


def _rows(
    path: Path,
    columns: Sequence[str],
    mapping: Columns | None = None,
    split: str = "train",
) -> list[dict[str, Any]] | None:
    """Rows of a CSV/TSV (header row), a JSON array of objects, JSON Lines, or a Hugging
    Face dataset (``save_to_disk`` directory, Parquet/Arrow file), each with at least
    ``columns`` once ``mapping`` renamed them. ``split="eval"`` asks for the source's own
    eval split: only a Hugging Face DatasetDict has one, every other source gives None."""
    from flora.train.hf_data import is_hf_source, train_and_eval_rows

    suffix = path.suffix.lower()
    if is_hf_source(path):
        train, eval_ = train_and_eval_rows(path)
        rows = train if split == "train" else eval_
        if rows is None:
            return None
        rows = [_mapped(r, mapping, str(path)) for r in rows]
        _check_columns(rows, columns, path)
    elif split != "train":
        return None
    elif suffix in {".jsonl", ".json"}:
        rows = _json_rows(path, columns, mapping)
    elif suffix in {".csv", ".tsv"}:
        rows = _csv_rows(path, columns, mapping)
    else:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(none)'}; "
            "use .csv, .jsonl, .json, .parquet or a datasets directory"
        )
    if not rows:
        raise DataError(f"{path}: no examples (empty data set)")
    return rows


def _check_mapping(mapping: Columns | None, present: Sequence[str], where: str) -> None:
    """DataError unless every column ``mapping`` names is in ``present`` (a header, or a
    row's keys): a mapped column is never silently ignored, even when the role's default
    column exists."""
    for role, column in (mapping or {}).items():
        if column not in present:
            raise DataError(
                f"{where}: --{role}-column {column!r}: no such column "
                f"(columns: {', '.join(map(str, present)) or 'none'})"
            )


def refuse_columns(mapping: Columns | None, why: str) -> None:
    """DataError when a column mapping is given for data without columns (``why``): a
    mapping is never silently ignored."""
    if mapping:
        role = next(iter(mapping))
        raise DataError(f"--{role}-column: {why} and has no columns to map")


def _mapped(row: dict[str, Any], mapping: Columns | None, where: str) -> dict[str, Any]:
    """``row`` with each role of ``mapping`` set from the column it names."""
    if not mapping:
        return row
    _check_mapping(mapping, list(row), where)
    out = dict(row)
    for role, column in mapping.items():
        out[role] = row[column]
    return out


def _check_columns(rows: list[dict[str, Any]], columns: Sequence[str], path: Path) -> None:
    if not rows:
        return
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        found = ", ".join(k for k in rows[0] if k not in columns) or "none"
        raise DataError(
            f"{path}: wrong columns: need {', '.join(missing)} (found {found}; "
            "map them with --text-column / --label-column / ...)"
        )


def _json_rows(path: Path, columns: Sequence[str], mapping: Columns | None) -> list[dict]:
    """A JSON array of objects, or JSON Lines (one object per line)."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        numbered = list(enumerate(items, 1))
        where = "item"
    else:
        numbered = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        where = "line"
    rows = []
    for n, row in numbered:
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: each {where} must be a JSON object")
        row = _mapped(row, mapping, f"{path}:{n}")
        missing = [c for c in columns if c not in row]
        if missing:
            raise DataError(f"{path}:{n}: missing field(s) {', '.join(missing)}")
        rows.append(row)
    return rows


def _csv_rows(path: Path, columns: Sequence[str], mapping: Columns | None) -> list[dict]:
    suffix = path.suffix.lower()
    reader = csv.DictReader(
        _read_text(path).splitlines(), delimiter="\t" if suffix == ".tsv" else ","
    )
    header = list(reader.fieldnames or [])
    _check_mapping(mapping, header, str(path))
    missing = [c for c in columns if c not in header and c not in (mapping or {})]
    if missing:
        raise DataError(
            f"{path}: wrong columns: need {', '.join(columns)}, found {', '.join(header) or 'none'}"
        )
    rows = []
    for lineno, row in enumerate(reader, 2):
        row = _mapped(row, mapping, f"{path}:{lineno}")
        if any(row.get(c) is None for c in columns):
            raise DataError(f"{path}:{lineno}: row has too few columns")
        rows.append(row)
    return rows


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a .csv or .jsonl file") from None


def load_text_labels(
    path: str | Path, columns: Columns | None = None, split: str = "train"
) -> list[tuple[str, str]] | None:
    """``(text, label)`` pairs from rows with ``text`` and ``label`` (CSV, JSON, JSONL,
    a Hugging Face dataset; ``columns`` maps other column names). None when ``split`` is
    ``eval`` and the source has no eval split."""
    p = _existing(path)
    rows = _rows(p, ("text", "label"), columns, split)
    if rows is None:
        return None
    out = []
    for row in rows:
        text, label = row["text"], row["label"]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{p}: every text must be a non-empty string")
        if isinstance(label, bool) or not isinstance(label, str | int):
            raise DataError(f"{p}: every label must be a string or an integer")
        out.append((text, str(label)))
    return out


def load_image_labels(
    path: str | Path, columns: Columns | None = None, split: str = "train"
) -> list[tuple[Image.Image, str]] | None:
    """``(RGB image, label)`` pairs from a folder with one sub-folder per class, a CSV or
    JSON(L) file with ``path,label`` (relative paths are relative to the file), or a
    Hugging Face dataset with ``image`` (decoded images) and ``label`` columns. Every image
    is decoded here, so an unreadable file fails before training starts."""
    p = _existing(path)
    from flora.train.hf_data import is_hf_source

    if p.is_dir() and not is_hf_source(p):
        refuse_columns(columns, f"{p} is an image folder (one sub-folder per class)")
        if split != "train":
            return None
        items = [
            (f, d.name)
            for d in sorted(q for q in p.iterdir() if q.is_dir())
            for f in sorted(d.iterdir())
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not items:
            raise DataError(f"{p}: no images (expected one sub-folder of images per class)")
        return [(read_image(f), label) for f, label in items]
    hf = is_hf_source(p)
    rows = _rows(p, ("image" if hf else "path", "label"), columns, split)
    if rows is None:
        return None
    if hf:
        return [(_as_image(r["image"], p), _label_name(r["label"])) for r in rows]
    return [(read_image(p.parent / str(r["path"])), str(r["label"])) for r in rows]


def _label_name(label: Any) -> str:
    # datasets' ClassLabel columns hold ints; name the class by its number
    if isinstance(label, int | float) and not isinstance(label, bool):
        return str(int(label))
    return str(label)


def _as_image(value: Any, where: Path) -> Image.Image:
    """A datasets image cell (a PIL image, ``{"bytes", "path"}`` or a path) as RGB."""
    import io

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and value.get("bytes"):
        try:
            with Image.open(io.BytesIO(value["bytes"])) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{where}: unreadable image bytes: {exc}") from None
    if isinstance(value, dict) and value.get("path"):
        return read_image(Path(value["path"]))
    if isinstance(value, str):
        return read_image(Path(value))
    raise DataError(f"{where}: the image column holds {type(value).__name__}, not an image")


def read_image(path: Path) -> Image.Image:
    """Decode one image to RGB; DataError if missing or unreadable."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"unreadable image {path}: {exc}") from None


def load_chats(
    path: str | Path, columns: Columns | None = None, split: str = "train"
) -> list[list[Message]] | None:
    """Conversations from JSON(L) or a Hugging Face dataset: ``{"messages": [{"role",
    "content"}, ...]}`` or ``{"prompt", "completion"}`` (a user turn and an assistant
    turn). The last message of each conversation must be the assistant's (that is what the
    loss is on)."""
    p = _existing(path)
    from flora.train.hf_data import is_hf_source

    if p.suffix.lower() not in {".jsonl", ".json"} and not is_hf_source(p):
        raise DataError(f"{p}: chat data must be JSON Lines, a JSON array or a datasets dir")
    rows = _rows(p, (), columns, split)
    if rows is None:
        return None
    chats: list[list[Message]] = []
    for i, row in enumerate(rows, 1):
        if row.get("messages") is not None:
            messages = row["messages"]
        elif row.get("prompt") is not None and row.get("completion") is not None:
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
    _check_fraction(fraction)
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
    """``--eval-split``: a fraction (``"0.1"``, checked to be in (0, 1)) or the spec of
    an eval file."""
    if value is None:
        return None
    try:
        fraction = float(value)
    except ValueError:
        return value
    _check_fraction(fraction)
    return fraction


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction < 1.0:
        raise DataError(f"--eval-split fraction must be in (0, 1), got {fraction}")


def stratified_sample(
    items: Sequence[T], k: int, key: Callable[[T], str] | None, seed: int
) -> list[T]:
    """A seeded random sample of ``k`` items (all when ``k`` is 0 or >= len), in their
    original order. With ``key``, every class gets its proportional share (largest
    remainders round; ties broken by the seeded RNG), so a class-sorted data set gives a
    sample with the data's class mix, not its first classes."""
    n = len(items)
    if k == 0 or k >= n:
        return list(items)
    rng = random.Random(seed)
    if key is None:
        return [items[i] for i in sorted(rng.sample(range(n), k))]
    by_class: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_class.setdefault(key(item), []).append(i)
    classes = list(by_class)
    quota = {c: k * len(by_class[c]) / n for c in classes}
    take = {c: int(quota[c]) for c in classes}
    spare = k - sum(take.values())
    order = sorted(classes, key=lambda c: (-(quota[c] - take[c]), rng.random()))
    for c in order[:spare]:
        take[c] += 1
    chosen = [i for c in classes for i in rng.sample(by_class[c], take[c])]
    return [items[i] for i in sorted(chosen)]
