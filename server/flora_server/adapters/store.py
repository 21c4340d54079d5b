"""Where adapter bytes live: the `AdapterStore` protocol and a local-directory implementation.

A store keeps one object per adapter id: the single-file form (a safetensors file whose
`__metadata__["adapter_config"]` holds the config JSON, see docs/architecture.md) and its
sha256. Layout of `LocalAdapterStore`:

    <root>/<id>.flora                          a symlink to the committed object: the commit
    <root>/.objects/<id>/<sha256>.flora        immutable objects, named by their digest
    <root>/.tmp-*                              writes in progress and private read copies

An id `org/name` is one directory level: `<root>/org/name.flora` links to
`<root>/.objects/org/name/<sha256>.flora`.

Why a link: a put must be atomic as a whole, including across a crash. It writes the object
under its digest (no reader looks there yet), fsyncs it, then swaps the link with one
`rename`: a reader, in this process or another sharing the directory, and a server that
restarts after a SIGKILL at any instant, sees either the old link (and the old object) or the
new one. The digest is in the target's name, so bytes and digest can never be out of step;
every read hashes the bytes and refuses a mismatch (on-disk corruption). Old objects are
removed after the commit; a reader that resolved the old link just before gets
`FileNotFoundError` and resolves again. Objects left by a writer that died before its commit
are invisible, and removed by the next put or delete of that id, or at start once old.

Stores written by earlier versions (`<id>.flora` as a regular file beside `<id>.flora.sha256`)
are converted at start: the data file was always renamed in whole before its digest file, so
the data file is the last complete write; when the two disagree (a crash between the two
renames) the data's own digest is adopted and a warning logged. A regular file placed by hand
is adopted the same way.

Ids are checked against the id rule (`flora_server.ids`), and resolved paths must stay under
the root: a symlink that points outside is refused.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import logging
import os
import re
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

# The store's errors live with its executor (which raises them); this module's users
# import them from here.
from flora_server.adapters.store_io import StoreError as StoreError
from flora_server.adapters.store_io import StoreExecutor
from flora_server.adapters.store_io import StoreUnavailableError as StoreUnavailableError
from flora_server.ids import ADAPTER_ID_RULE, is_valid_adapter_id

logger = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
SUFFIX = ".flora"
LEGACY_DIGEST_SUFFIX = ".flora.sha256"
OBJECTS = ".objects"
_OBJECT_RE = re.compile(r"^([0-9a-f]{64})\.flora$")
# A reader can resolve a link just before an overwrite removes its object: resolve again.
_READ_ATTEMPTS = 5
_READ_RETRY_SECONDS = 0.05
# Objects not named by a link and older than this are a dead writer's leftovers (a live
# writer commits milliseconds after writing its object).
ORPHAN_SECONDS = 600.0
CRASH_ENV = "FLORA_TEST_CRASH_AT"
"""Test hook: a put SIGKILLs its own process at the named point (`object-written`: the new
object is on disk, the link not yet swapped; `committed`: swapped, old objects not yet
removed). Used by the crash tests; unset in production."""


def crash_point(name: str) -> None:
    """SIGKILL this process when `FLORA_TEST_CRASH_AT` names this point (see `CRASH_ENV`)."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


class InvalidAdapterIdError(StoreError, ValueError):
    def __init__(self, adapter_id: str) -> None:
        super().__init__(f"adapter id {adapter_id!r} {ADAPTER_ID_RULE}")
        self.adapter_id = adapter_id


class UnsafePathError(StoreError):
    """A path in the store resolves outside the store root."""


class DigestMismatchError(StoreError):
    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"sha256 mismatch: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class StoredAdapterMissingError(StoreError, KeyError):
    def __init__(self, adapter_id: str) -> None:
        super().__init__(adapter_id)
        self.adapter_id = adapter_id

    def __str__(self) -> str:
        return f"adapter {self.adapter_id!r} is not in the store"


@dataclass(frozen=True)
class StoredAdapter:
    id: str
    sha256: str
    size_bytes: int
    modified: float  # seconds since the epoch


@dataclass(frozen=True)
class StoredCopy:
    """A private local copy of a stored adapter whose bytes hash to `sha256`."""

    path: Path
    sha256: str
    size_bytes: int


class AdapterStore(Protocol):
    """Adapter bytes by id. Implementations: `LocalAdapterStore` (a directory, possibly shared
    by replicas) and `S3AdapterStore` (`flora_server.adapters.s3_store`); `open_store` in
    `flora_server.adapters.open_store` picks one from the settings.

    The methods block (file or network I/O). Callers on the event loop run them on the
    store's own `executor`, never on asyncio's default executor: a stalled store then holds
    only its own bounded workers, and a caller that waits past the executor's timeout gets
    `StoreUnavailableError` (see `flora_server.adapters.store_io`)."""

    executor: StoreExecutor

    def put(self, adapter_id: str, data: BinaryIO, *, sha256: str | None = None) -> StoredAdapter:
        """Store `data` atomically under `adapter_id`, replacing any previous object. When
        `sha256` is given the bytes must hash to it, else `DigestMismatchError` and nothing
        changes."""
        ...

    def get_bytes(self, adapter_id: str) -> bytes: ...

    def checkout(self, adapter_id: str) -> contextlib.AbstractContextManager[StoredCopy]:
        """A verified private copy (bytes and the digest they hash to, read together) that
        no concurrent put or delete can change while the context is open."""
        ...

    @contextlib.contextmanager
    def local_path(self, adapter_id: str) -> Iterator[Path]:
        """A local file holding the adapter while the context is open."""
        ...

    def read_prefix(self, adapter_id: str, nbytes: int) -> tuple[str, bytes]:
        """(sha256 of the committed object, its first `nbytes` bytes), read from that one
        object: the bytes belong to the digest even if a put commits meanwhile."""
        ...

    def delete(self, adapter_id: str) -> bool: ...

    def list(self) -> list[str]:
        """Every stored id, sorted."""
        ...

    def exists(self, adapter_id: str) -> bool: ...

    def digest(self, adapter_id: str) -> str: ...

    def stat(self, adapter_id: str) -> StoredAdapter: ...


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def copy_hashing(src: BinaryIO, out: BinaryIO) -> tuple[str, int]:
    """Copy `src` to `out` in 1 MiB chunks; return (sha256 hex of the bytes, their count).
    Hashing while copying reads the bytes once, and the digest is of what was written."""
    h, size = hashlib.sha256(), 0
    while chunk := src.read(_CHUNK):
        h.update(chunk)
        size += len(chunk)
        out.write(chunk)
    return h.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    # Make a rename itself durable; not every platform allows opening a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stage(directory: Path, data: BinaryIO, expected: str | None) -> tuple[Path, str, int]:
    """Copy `data` to a fsynced temp file in `directory`, hashing as it goes; check the
    digest. Returns (temp path, sha256 hex, size); the caller renames or removes it."""
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            actual, size = copy_hashing(data, out)
            out.flush()
            os.fsync(out.fileno())
        if expected is not None and expected.lower() != actual:
            raise DigestMismatchError(expected, actual)
        return tmp, actual, size
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class LocalAdapterStore:
    """An `AdapterStore` on a local (or shared ReadWriteMany) directory; see the module
    docstring for the layout and why a put is atomic."""

    def __init__(self, root: Path, *, executor: StoreExecutor | None = None) -> None:
        self.executor = executor or StoreExecutor()
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self._objects = self.root / OBJECTS
        self._objects.mkdir(exist_ok=True)
        self._recover()

    # -- paths ---------------------------------------------------------------------------
    def _inside(self, path: Path) -> Path:
        # resolve() follows symlinks: a link (or an org directory) pointing outside is refused.
        try:
            resolved = path.resolve()
        except FileNotFoundError:
            # realpath races with a concurrent delete (lstat saw the link, readlink did
            # not): the entry is gone, and a missing entry points nowhere.
            resolved = path.parent.resolve() / path.name
        if not resolved.is_relative_to(self.root):
            raise UnsafePathError(f"{path} resolves outside the adapter store")
        return path

    def _link(self, adapter_id: str) -> Path:
        """The committed entry of `adapter_id` (which may not exist)."""
        if not is_valid_adapter_id(adapter_id):
            raise InvalidAdapterIdError(adapter_id)
        return self._inside(self.root / f"{adapter_id}{SUFFIX}")

    def _object_dir(self, adapter_id: str) -> Path:
        return self._objects / adapter_id

    def _resolve(self, adapter_id: str) -> tuple[str, Path]:
        """(digest, object path) of the committed entry; StoredAdapterMissingError if none.
        A link names its digest; a regular file (placed by hand since the start-up
        conversion) is hashed as it is now."""
        link = self._link(adapter_id)
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            raise StoredAdapterMissingError(adapter_id) from None
        except OSError:  # not a link
            if not link.is_file():
                raise StoredAdapterMissingError(adapter_id) from None
            return sha256_file(link), link
        match = _OBJECT_RE.fullmatch(Path(target).name)
        path = link.parent / target
        if match is None:
            raise UnsafePathError(f"{link} links to {target!r}, not to a stored object")
        return match.group(1), path

    # -- AdapterStore --------------------------------------------------------------------
    def put(self, adapter_id: str, data: BinaryIO, *, sha256: str | None = None) -> StoredAdapter:
        started = time.time()
        link = self._link(adapter_id)
        object_dir = self._object_dir(adapter_id)
        tmp, digest, size = _stage(self.root, data, sha256)
        try:
            obj = object_dir / f"{digest}{SUFFIX}"
            for attempt in range(_READ_ATTEMPTS):  # a concurrent delete may rmdir the dir
                object_dir.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(tmp, obj)
                    break
                except FileNotFoundError:
                    if attempt == _READ_ATTEMPTS - 1:
                        raise
            _fsync_dir(object_dir)
            crash_point("object-written")
            link.parent.mkdir(parents=True, exist_ok=True)
            self._inside(link.parent)
            tmp_link = self.root / f".tmp-link-{os.getpid()}-{time.monotonic_ns()}"
            os.symlink(os.path.relpath(obj, link.parent), tmp_link)
            try:
                os.replace(tmp_link, link)  # the commit
            except BaseException:
                tmp_link.unlink(missing_ok=True)
                raise
            _fsync_dir(link.parent)
        finally:
            tmp.unlink(missing_ok=True)
        crash_point("committed")
        self.root.joinpath(f"{adapter_id}{LEGACY_DIGEST_SUFFIX}").unlink(missing_ok=True)
        self._drop_objects(adapter_id, written_before=started)
        return StoredAdapter(adapter_id, digest, size, link.lstat().st_mtime)

    def get_bytes(self, adapter_id: str) -> bytes:
        with self.checkout(adapter_id) as copy:
            return copy.path.read_bytes()

    @contextlib.contextmanager
    def checkout(self, adapter_id: str) -> Iterator[StoredCopy]:
        copy = self._copy_verified(adapter_id)
        try:
            yield copy
        finally:
            copy.path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def local_path(self, adapter_id: str) -> Iterator[Path]:
        with self.checkout(adapter_id) as copy:
            yield copy.path

    def read_prefix(self, adapter_id: str, nbytes: int) -> tuple[str, bytes]:
        for attempt in range(_READ_ATTEMPTS):
            digest, path = self._resolve(adapter_id)
            try:
                with self._inside(path).open("rb") as f:
                    return digest, f.read(nbytes)
            except FileNotFoundError:  # replaced meanwhile: resolve the new link
                if attempt < _READ_ATTEMPTS - 1:
                    time.sleep(_READ_RETRY_SECONDS)
        raise StoredAdapterMissingError(adapter_id)

    def _copy_verified(self, adapter_id: str) -> StoredCopy:
        for attempt in range(_READ_ATTEMPTS):
            expected, path = self._resolve(adapter_id)
            fd, tmp_name = tempfile.mkstemp(prefix=".tmp-read-", dir=self.root)
            tmp = Path(tmp_name)
            try:
                with self._inside(path).open("rb") as src, os.fdopen(fd, "wb") as out:
                    actual, size = copy_hashing(src, out)
            except FileNotFoundError:  # an overwrite removed the object: resolve again
                tmp.unlink(missing_ok=True)
                if attempt < _READ_ATTEMPTS - 1:
                    time.sleep(_READ_RETRY_SECONDS)
                    continue
                raise StoredAdapterMissingError(adapter_id) from None
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            if actual == expected:
                return StoredCopy(tmp, actual, size)
            tmp.unlink(missing_ok=True)
            if path.name == f"{expected}{SUFFIX}":  # an immutable object: corruption
                break
            time.sleep(_READ_RETRY_SECONDS)  # a regular file being rewritten by hand
        raise DigestMismatchError(expected, actual)

    def delete(self, adapter_id: str) -> bool:
        started = time.time()
        link = self._link(adapter_id)
        existed = link.is_symlink() or link.is_file()
        link.unlink(missing_ok=True)  # from this instant the adapter is gone
        self.root.joinpath(f"{adapter_id}{LEGACY_DIGEST_SUFFIX}").unlink(missing_ok=True)
        _fsync_dir(link.parent)
        self._drop_objects(adapter_id, written_before=started)
        return existed

    def list(self) -> list[str]:
        ids = []
        for entry in self.root.iterdir():
            name = entry.name
            if name.startswith("."):
                continue
            if name.endswith(SUFFIX):
                ids.append(name[: -len(SUFFIX)])
            elif entry.is_dir() and not entry.is_symlink():
                ids.extend(
                    f"{name}/{child.name[: -len(SUFFIX)]}"
                    for child in entry.iterdir()
                    if child.name.endswith(SUFFIX)
                )
        return sorted(i for i in ids if self.exists(i))

    def exists(self, adapter_id: str) -> bool:
        try:
            return self._link(adapter_id).is_file()  # follows the link: a dangling one is no
        except (InvalidAdapterIdError, UnsafePathError):
            return False

    def digest(self, adapter_id: str) -> str:
        return self._resolve(adapter_id)[0]

    def stat(self, adapter_id: str) -> StoredAdapter:
        for attempt in range(_READ_ATTEMPTS):
            digest, path = self._resolve(adapter_id)
            try:
                size = self._inside(path).stat().st_size
                modified = self._link(adapter_id).lstat().st_mtime
                return StoredAdapter(adapter_id, digest, size, modified)
            except FileNotFoundError:
                if attempt < _READ_ATTEMPTS - 1:
                    time.sleep(_READ_RETRY_SECONDS)
        raise StoredAdapterMissingError(adapter_id)

    # -- upkeep --------------------------------------------------------------------------
    def _drop_objects(self, adapter_id: str, written_before: float) -> None:
        """Remove the objects of `adapter_id` that its link does not name and that were
        written before `written_before` (a concurrent writer's newer object is kept)."""
        try:
            keep = self._resolve(adapter_id)[1].name
        except (StoredAdapterMissingError, UnsafePathError):
            keep = None
        object_dir = self._object_dir(adapter_id)
        try:
            entries = list(object_dir.iterdir())
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name == keep or not _OBJECT_RE.fullmatch(entry.name):
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime < written_before:
                    entry.unlink()
        with contextlib.suppress(OSError):  # not empty (kept object, org sub-directory)
            object_dir.rmdir()

    def _recover(self) -> None:
        """Start-up pass: convert entries of the earlier layout, drop dead writers' objects."""
        for adapter_id in self._legacy_ids():
            try:
                self._convert_legacy(adapter_id)
            except OSError as exc:  # another replica converting it at the same time
                logger.warning("converting stored adapter %s failed: %s", adapter_id, exc)
        cutoff = time.time() - ORPHAN_SECONDS
        for object_dir in {p.parent for p in self._objects.rglob(f"*{SUFFIX}")}:
            adapter_id = object_dir.relative_to(self._objects).as_posix()
            if is_valid_adapter_id(adapter_id):
                self._drop_objects(adapter_id, written_before=cutoff)

    def _legacy_ids(self) -> builtins.list[str]:  # `list` here is the method above
        ids = []
        for entry in [*self.root.glob(f"*{SUFFIX}"), *self.root.glob(f"*/*{SUFFIX}")]:
            adapter_id = entry.relative_to(self.root).as_posix()[: -len(SUFFIX)]
            if is_valid_adapter_id(adapter_id) and not entry.is_symlink() and entry.is_file():
                ids.append(adapter_id)
        return ids

    def _convert_legacy(self, adapter_id: str) -> None:
        link = self._link(adapter_id)
        digest_file = self.root / f"{adapter_id}{LEGACY_DIGEST_SUFFIX}"
        digest = sha256_file(link)
        with contextlib.suppress(FileNotFoundError):
            recorded = digest_file.read_text().strip()
            if recorded != digest:
                logger.warning(
                    "adapter %s: the digest file says %s, the data hashes to %s (a write "
                    "interrupted between its two renames); keeping the data",
                    adapter_id,
                    recorded,
                    digest,
                )
        with link.open("rb") as f:
            self.put(adapter_id, f, sha256=digest)
