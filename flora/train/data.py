"""Training data from files: labelled text (CSV/JSONL), chat JSONL; stratified eval splits;
label encoding; the row reading that labelled images share (`flora.train.image_data`).

Every problem a user can fix is a :class:`DataError` whose message names the file and
the line (CSV/JSONL), the item (a JSON array) or the split and row (``train[3]``, a
Hugging Face dataset), so the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from flora.train.errors import DataError

T = TypeVar("T")

Message = dict[str, str]
Row = tuple[str, dict[str, Any]]
"""A data row and where it is (``file:line``, ``file: item N``, ``dataset: split[i]``)."""


@dataclass
class Splits:
    """Train and eval examples; ``eval`` is None when the source has no fixed split."""

    train: list[Any]
    eval: list[Any] | None = None


def existing_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data file not found: {p}")
    return p


Columns = dict[str, str]
"""Column mapping: role (``text``, ``label``, ``image``, ...) -> the column holding it."""


def read_rows(
    path: Path,
    columns: Sequence[str],
    mapping: Columns | None = None,
    split: str = "train",
) -> list[Row] | None:
    """Rows of a CSV/TSV (header row), a JSON array of objects, JSON Lines, or a Hugging
    Face dataset (``save_to_disk`` directory, Parquet/Arrow file), each with at least
    ``columns`` once ``mapping`` renamed them, and where each row is. ``split="eval"`` asks
    for the source's own eval split: only a Hugging Face DatasetDict has one, every other
    source gives None."""
    from flora.train.hf_data import is_hf_source, train_and_eval_rows

    suffix = path.suffix.lower()
    rows: list[Row]
    if is_hf_source(path):
        train, eval_ = train_and_eval_rows(path)
        part = train if split == "train" else eval_
        if part is None:
            return None
        name, raw = part
        located = [(f"{path}: {name}[{i}]", r) for i, r in enumerate(raw)]
        rows = [(where, _mapped(r, mapping, where)) for where, r in located]
        _check_columns([r for _, r in rows], columns, path)
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


def _loads(text: str, path: Path, lineno: int | None = None) -> Any:
    """``json.loads``; DataError naming the line when ``text`` is not valid JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{lineno or exc.lineno}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        where = f"{path}:{lineno}" if lineno else str(path)
        raise DataError(f"{where}: JSON nested too deeply") from None


def _json_rows(path: Path, columns: Sequence[str], mapping: Columns | None) -> list[Row]:
    """A JSON array of objects, or JSON Lines (one object per line). Lines end at ``\n``
    (or ``\r\n``) only: U+2028 or U+0085 inside a JSON string is text, not a line end."""
    text = _read_text(path)
    numbered: list[tuple[str, Any]]
    if text.lstrip().startswith("["):
        items = _loads(text, path)
        numbered = [(f"{path}: item {n}", item) for n, item in enumerate(items, 1)]
        what = "item"
    else:
        numbered = []
        for lineno, line in enumerate(text.split("\n"), 1):
            if line.strip(" \t\r"):  # JSON's whitespace; a blank line is no example
                numbered.append((f"{path}:{lineno}", _loads(line, path, lineno)))
        what = "line"
    rows = []
    for where, row in numbered:
        if not isinstance(row, dict):
            raise DataError(f"{where}: each {what} must be a JSON object")
        row = _mapped(row, mapping, where)
        missing = [c for c in columns if c not in row]
        if missing:
            raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
        rows.append((where, row))
    return rows


def _csv_rows(path: Path, columns: Sequence[str], mapping: Columns | None) -> list[Row]:
    """Rows of a CSV/TSV with a header. Read as the csv module wants a file (newline=""),
    so a quoted field keeps its line breaks; a row with more fields than the header (an
    unquoted delimiter) and a header naming a column twice are errors, not guesses."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter)
    try:
        header = next(reader, [])
        twice = [c for i, c in enumerate(header) if c and c in header[:i]]
        if twice:
            raise DataError(f"{path}:1: the header names column {twice[0]!r} twice")
        _check_mapping(mapping, header, str(path))
        missing = [c for c in columns if c not in header and c not in (mapping or {})]
        if missing:
            found = ", ".join(header) or "none"
            raise DataError(f"{path}: wrong columns: need {', '.join(columns)}, found {found}")
        rows = []
        next_line = reader.line_num + 1
        for fields in reader:
            where, next_line = f"{path}:{next_line}", reader.line_num + 1  # a row's first line
            if not fields:  # a blank line
                continue
            if len(fields) > len(header):
                raise DataError(
                    f"{where}: {len(fields)} fields, the header has {len(header)} "
                    f"(quote a field that holds {delimiter!r})"
                )
            padded = fields + [None] * (len(header) - len(fields))  # missing fields: None
            row = _mapped(dict(zip(header, padded, strict=True)), mapping, where)
            if any(row.get(c) is None for c in columns):
                raise DataError(f"{where}: row has too few columns")
            rows.append((where, row))
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    return rows


def _read_text(path: Path) -> str:
    """The file's text as it is: a byte order mark dropped, line ends not translated (a
    quoted CSV field keeps its ``\r\n``; JSON Lines end at ``\n``)."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            return f.read()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a .csv or .jsonl file") from None


def describe(value: Any) -> str:
    if value is None:
        return "null"
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 40 else shown[:37] + '...'}"


def valid_unicode(value: str, where: str, what: str) -> str:
    """``value``; DataError if it holds a lone surrogate (JSON's unpaired ``\\ud800``
    escape), which is no Unicode text: a tokenizer or a UTF-8 writer would fail on it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(value[exc.start])
        raise DataError(f"{where}: the {what} holds a lone surrogate U+{code:04X}") from None
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: the text must be a non-empty string, got {describe(value)}")
    return valid_unicode(value, where, "text")


def label_name(value: Any, where: str) -> str:
    """The class name of a label cell: a non-empty string, or an integer (a ``ClassLabel``
    is named by its number). Floats (0.5 and 1.0 alike) and nulls are refused, not rounded
    or named ``'None'``."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(f"{where}: the label must be a string or an integer, got {describe(value)}")
    name = str(value)
    if not name.strip():
        raise DataError(f"{where}: empty label")
    return valid_unicode(name, where, "label")


def load_text_labels(
    path: str | Path, columns: Columns | None = None, split: str = "train"
) -> list[tuple[str, str]] | None:
    """``(text, label)`` pairs from rows with ``text`` and ``label`` (CSV, JSON, JSONL,
    a Hugging Face dataset; ``columns`` maps other column names). None when ``split`` is
    ``eval`` and the source has no eval split."""
    p = existing_path(path)
    rows = read_rows(p, ("text", "label"), columns, split)
    if rows is None:
        return None
    return [(_text(row["text"], where), label_name(row["label"], where)) for where, row in rows]


def load_chats(
    path: str | Path, columns: Columns | None = None, split: str = "train"
) -> list[list[Message]] | None:
    """Conversations from JSON(L) or a Hugging Face dataset: ``{"messages": [{"role",
    "content"}, ...]}`` or ``{"prompt", "completion"}`` (a user turn and an assistant
    turn). The last message of each conversation must be the assistant's (that is what the
    loss is on)."""
    p = existing_path(path)
    from flora.train.hf_data import is_hf_source

    if p.suffix.lower() not in {".jsonl", ".json"} and not is_hf_source(p):
        raise DataError(f"{p}: chat data must be JSON Lines, a JSON array or a datasets dir")
    rows = read_rows(p, (), columns, split)
    if rows is None:
        return None
    chats: list[list[Message]] = []
    for where, row in rows:
        if row.get("messages") is not None:
            messages = row["messages"]
        elif row.get("prompt") is not None and row.get("completion") is not None:
            messages = [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["completion"]},
            ]
        else:
            raise DataError(f"{where}: needs 'messages' or 'prompt' and 'completion'")
        chats.append(check_chat(messages, where))
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
        out.append({"role": m["role"], "content": valid_unicode(m["content"], where, "content")})
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
    train: Sequence[tuple[Any, str]],
    eval_: Sequence[tuple[Any, str]],
    where: str,
    eval_where: str | None = None,
) -> tuple[list[tuple[Any, int]], list[tuple[Any, int]], list[str]]:
    """Map label names to ids: the names sorted by :func:`label_order`, id = position.

    DataError if a set is empty, there are fewer than two classes, or an eval label never
    occurs in training. ``where`` names the training data, ``eval_where`` the eval data
    (an ``--eval-split`` file; default ``where``)."""
    eval_where = eval_where or where
    if not train:
        raise DataError(f"{where}: the training set is empty")
    if not eval_:
        raise DataError(f"{eval_where}: the eval set is empty")
    names = sorted({lab for _, lab in train}, key=label_order)
    if len(names) < 2:
        raise DataError(f"{where}: need at least two classes, found {names}")
    ids = {n: i for i, n in enumerate(names)}
    unknown = sorted({lab for _, lab in eval_ if lab not in ids}, key=label_order)
    if unknown:
        in_train = "" if eval_where == where else f" ({where})"
        raise DataError(
            f"{eval_where}: unknown label in eval: {unknown[0]!r} never occurs in "
            f"training{in_train}"
        )
    return (
        [(x, ids[lab]) for x, lab in train],
        [(x, ids[lab]) for x, lab in eval_],
        names,
    )


_INTEGER = re.compile(r"-?[0-9]+")


def label_order(name: str) -> tuple[int, Decimal, str]:
    """Sort key of class names, a total order that does not depend on the input's order or
    Python's hash seed: integers (ASCII digits with an optional leading ``-``: ``"-2"``,
    ``"01"``) first, by value; then every other name (``"--1"``, ``"1.5"``, ``"²"``,
    ``"cat"``). Ties (``"01"`` and ``"1"``, equal values) and the other names are ordered by
    their code points. So ``["-2", "01", "1", "10", "--1", "B", "b"]`` is sorted."""
    if _INTEGER.fullmatch(name):
        return (0, Decimal(name), name)
    return (1, Decimal(0), name)


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
