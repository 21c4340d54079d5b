"""Labelled images for training: a folder per class, a CSV or JSON(L) of ``path,label``,
or a Hugging Face dataset with ``image`` and ``label`` columns. Images stay encoded
(:class:`EncodedImage`) and are decoded per batch, each once at load so that an unreadable
file fails before training starts. Problems are :class:`DataError`, as in
:mod:`flora.train.data`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from flora.models.image_decode import to_rgb
from flora.train.data import (
    Columns,
    describe,
    existing_path,
    label_name,
    read_rows,
    refuse_columns,
    valid_unicode,
)
from flora.train.errors import DataError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class EncodedImage:
    """An image kept as its file or its encoded bytes, decoded (to 8-bit RGB, by
    :func:`flora.models.image_decode.to_rgb`) each time it is used, so a data set costs its
    encoded size in memory plus the batch being decoded, not every image at full size.

    It stands in for a PIL image where the trainer uses one: ``ImageTransform`` reads
    ``width`` and ``height`` and crops (``crop`` reads the file and crops; the transform
    converts the region). The whole image is decoded once when this is made, so an
    unreadable file fails before training starts.
    """

    def __init__(self, source: Path | bytes, name: str) -> None:
        self.source, self.name = source, name
        with self._opened() as im:
            im.load()
            self.width, self.height = im.size

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def decode(self) -> Image.Image:
        """The image as a new 8-bit RGB PIL image."""
        with self._opened() as im:
            return to_rgb(im)

    def crop(self, box: tuple[float, float, float, float]) -> Image.Image:
        """The region in the stored mode: the transform converts only the region to RGB
        (the same pixels, `to_rgb` being per pixel), not the whole image first."""
        with self._opened() as im:
            return im.crop(box)

    def __repr__(self) -> str:
        return f"EncodedImage({self.name!r}, {self.width}x{self.height})"

    @contextmanager
    def _opened(self) -> Iterator[Image.Image]:
        source = io.BytesIO(self.source) if isinstance(self.source, bytes) else self.source
        try:
            with Image.open(source) as im:
                yield im
        except FileNotFoundError:
            raise DataError(f"{self.name}: image not found") from None
        except Image.DecompressionBombError as exc:  # Pillow's limit, 2 x MAX_IMAGE_PIXELS
            raise DataError(f"{self.name}: too many pixels ({exc})") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{self.name}: unreadable image ({exc})") from None


TrainImage = EncodedImage | Image.Image


def load_image_labels(
    path: str | Path, columns: Columns | None = None, split: str = "train"
) -> list[tuple[TrainImage, str]] | None:
    """``(image, label)`` pairs from a folder with one sub-folder per class (see
    :func:`folder_images`), a CSV or JSON(L) file with ``path,label`` (relative paths are
    relative to the file), or a Hugging Face dataset with ``image`` and ``label`` columns.
    Images are kept encoded (:class:`EncodedImage`) and decoded per batch; each one is
    decoded once here, so an unreadable file fails before training starts."""
    p = existing_path(path)
    from flora.train.hf_data import is_hf_source

    if p.is_dir() and not is_hf_source(p):
        refuse_columns(columns, f"{p} is an image folder (one sub-folder per class)")
        if split != "train":
            return None
        return [(EncodedImage(f, str(f)), label) for f, label in folder_images(p)]
    hf = is_hf_source(p)
    rows = read_rows(p, ("image" if hf else "path", "label"), columns, split)
    if rows is None:
        return None
    if hf:
        return [(_as_image(r["image"], where), label_name(r["label"], where)) for where, r in rows]
    out: list[tuple[TrainImage, str]] = []
    for where, r in rows:
        file = r["path"]
        if not isinstance(file, str) or not file.strip():
            raise DataError(f"{where}: the path must be a non-empty string, got {describe(file)}")
        image = p.parent / valid_unicode(file, where, "path")
        out.append((EncodedImage(image, f"{where}: {image}"), label_name(r["label"], where)))
    return out


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image(name: str) -> bool:
    return not _hidden(name) and Path(name).suffix.lower() in IMAGE_SUFFIXES


def folder_images(root: Path) -> list[tuple[Path, str]]:
    """``(file, class)`` for an image folder, torchvision ``ImageFolder``'s layout: every
    first-level sub-folder is a class, and its images are found at any depth below it
    (sorted by path; symbolic links followed, each folder once). Hidden files and folders
    (``.name``) and files without an image suffix are not data. An image directly in
    ``root`` (no class) and a class folder without images are errors."""
    loose = sorted(f.name for f in root.iterdir() if _is_image(f.name) and f.is_file())
    if loose:
        raise DataError(f"{root / loose[0]}: an image outside the class sub-folders (no class)")
    items = []
    for folder in sorted(d for d in root.iterdir() if d.is_dir() and not _hidden(d.name)):
        files = _images_below(folder)
        if not files:
            raise DataError(f"{folder}: class folder {folder.name!r} holds no images")
        items += [(f, folder.name) for f in files]
    if not items:
        raise DataError(f"{root}: no images (expected one sub-folder of images per class)")
    return items


def _images_below(folder: Path) -> list[Path]:
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a link back up, or a second link to one folder
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not _hidden(d)]
        found += [Path(top, f) for f in files if _is_image(f)]
    return sorted(found)


def _as_image(value: Any, where: str) -> TrainImage:
    """A datasets image cell (``{"bytes", "path"}``, a path, or a decoded PIL image)."""
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, dict) and value.get("bytes"):
        return EncodedImage(bytes(value["bytes"]), where)
    if isinstance(value, dict) and isinstance(value.get("path"), str) and value["path"]:
        return EncodedImage(Path(value["path"]), f"{where}: {value['path']}")
    if isinstance(value, str) and value:
        return EncodedImage(Path(value), f"{where}: {value}")
    raise DataError(f"{where}: the image column holds {describe(value)}, not an image")
