"""Where converted models live and how they are written.

Conversions write into a temporary directory beside the final one, fsync every file and
the directory, then ``rename`` it into place. ``rename`` of a directory is atomic on POSIX,
so a reader sees either no directory or a complete one; an interrupted conversion leaves
only a ``.<name>.tmp-*`` directory, removed by the next conversion under the same lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_ENV_HOME = "FLORA_HOME"
_TMP_MARK = ".tmp-"


def home(home: str | os.PathLike[str] | None = None) -> Path:
    """Resolve FLORA_HOME: the argument, else ``$FLORA_HOME``, else ``~/.cache/flora``.

    The environment is read on every call (never at import), so tests can set it.
    """
    if home is not None:
        return Path(home).expanduser()
    env = os.environ.get(_ENV_HOME)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "flora"


def models_dir(home_dir: Path) -> Path:
    """Directory holding one converted sub-directory per registered model."""
    return home_dir / "models"


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (directories after their contents)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _publish_modes(root: Path) -> None:
    """mkdtemp makes 0700 directories (and some writers 0600 files); a converted model is
    read by other users too (a server running unprivileged over a prepared image)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def conversion_lock(final: Path) -> Iterator[None]:
    """Exclusive inter-process lock for converting into ``final``.

    Two processes preparing the same model (say two server replicas on one volume) would
    otherwise both spend the conversion time; the second one waits and then finds the
    directory complete.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.parent / f".{final.name}.lock"
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def remove_stale_temporaries(final: Path) -> None:
    """Delete leftovers of interrupted conversions of ``final``; call under the lock."""
    prefix = f".{final.name}{_TMP_MARK}"
    for entry in final.parent.glob(f"{prefix}*"):
        shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes ``final`` when the block succeeds.

    On an exception the temporary directory is removed and ``final`` is untouched. An
    existing ``final`` (an older or broken conversion) is replaced: it is first renamed
    aside, so the window without a valid directory is two renames long.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{_TMP_MARK}", dir=final.parent))
    try:
        yield tmp
        _publish_modes(tmp)
        fsync_tree(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}{_TMP_MARK}old-", dir=final.parent))
            os.rename(final, old / final.name)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """Write JSON (sorted keys, trailing newline) to ``path``."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    """Read a JSON file."""
    return json.loads(path.read_text(encoding="utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a fsynced temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TMP_MARK}", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
