"""Hugging Face ``datasets`` inputs: a ``save_to_disk`` directory (a Dataset or a
DatasetDict) or a local Parquet/Arrow data file, read as rows of plain dicts.

``datasets`` is optional (``pip install flora-serve[datasets]``); it is imported only
when such an input is given. Nothing is downloaded: only local paths are accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flora.train.errors import DataError

# Files ``save_to_disk`` writes: a Dataset has state.json, a DatasetDict dataset_dict.json.
_DISK_MARKERS = ("dataset_dict.json", "state.json")
DATA_FILE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}
EVAL_SPLITS = ("validation", "test", "eval")


def is_hf_source(path: Path) -> bool:
    """Whether ``path`` is a ``save_to_disk`` directory or a Parquet/Arrow data file."""
    if path.is_dir():
        return any((path / m).is_file() for m in _DISK_MARKERS)
    return path.suffix.lower() in DATA_FILE_SUFFIXES


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(
            "reading Hugging Face datasets needs the 'datasets' package "
            "(pip install 'flora-serve[datasets]')"
        ) from None
    return datasets


def _load(path: Path) -> Any:
    ds = _datasets()
    try:
        if path.is_dir():
            return ds.load_from_disk(str(path))
        builder = DATA_FILE_SUFFIXES[path.suffix.lower()]
        return ds.load_dataset(builder, data_files={"train": str(path)})
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise DataError(f"{path}: cannot read as a Hugging Face dataset ({exc})") from None
    except IndexError:  # datasets cannot load a saved split that has no rows (no shards)
        raise DataError(
            f"{path}: cannot read as a Hugging Face dataset: a split has no rows"
        ) from None


def _images_undecoded(part: Any) -> Any:
    """``part`` with its image columns read as ``{"bytes", "path"}`` cells, not decoded PIL
    images: the trainer keeps images encoded and decodes them per batch."""
    ds = _datasets()
    for name, feature in (part.features or {}).items():
        if isinstance(feature, ds.Image) and feature.decode:
            part = part.cast_column(name, ds.Image(decode=False))
    return part


Split = tuple[str, list[dict[str, Any]]]
"""A split's name and its rows."""


def hf_splits(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Rows per split (a plain Dataset is the split ``train``); image cells undecoded."""
    loaded = _load(path)
    parts = dict(loaded) if hasattr(loaded, "keys") else {"train": loaded}
    if not parts:
        raise DataError(f"{path}: no splits (an empty DatasetDict)")
    return {name: [dict(row) for row in _images_undecoded(part)] for name, part in parts.items()}


def train_and_eval_rows(path: Path) -> tuple[Split, Split | None]:
    """The ``train`` split's rows and those of its eval split (``validation``, ``test``
    or ``eval``, the first present; None when there is none), each with its name."""
    splits = hf_splits(path)
    if "train" not in splits:
        if len(splits) != 1:
            raise DataError(f"{path}: no 'train' split (found {', '.join(sorted(splits))})")
        return next(iter(splits.items())), None
    eval_name = next((n for n in EVAL_SPLITS if n in splits), None)
    train = ("train", splits["train"])
    return train, None if eval_name is None else (eval_name, splits[eval_name])
