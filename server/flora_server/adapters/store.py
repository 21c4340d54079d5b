"""Where adapter bytes live: the `AdapterStore` protocol and a local-directory implementation.

A store keeps one object per adapter id: the single-file form (a safetensors file whose
`__metadata__["adapter_config"]` holds the config JSON, see docs/architecture.md) and its
sha256. Layout of `LocalAdapterStore`:

    <root>/<id>.flora          the adapter
    <root>/<id>.flora.sha256   its hex digest, checked on every read
    <root>/.tmp-*              writes in progress (same directory, so rename is atomic) and
                               private copies being read (`checkout`)

Several processes may share the directory (replicas on a ReadWriteMany volume). A put renames
the data file, then its digest file: a reader in another process can fall between the two
renames and see new bytes with the old digest. `checkout` therefore reads the digest first,
copies the bytes to a private file while hashing them, and retries a few times on a
mismatch; the copy, not the live path, is what callers read, so a rename during their read
cannot swap the bytes under them.

Ids are checked against the id pattern, and resolved paths must stay under the root: a
symlink that points outside is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from flora_server.settings import is_valid_adapter_id

_CHUNK = 1024 * 1024
SUFFIX = ".flora"
DIGEST_SUFFIX = ".flora.sha256"
# A concurrent writer's two renames are microseconds apart; 5 tries over ~0.3 s ride them out
# and still report real corruption promptly.
_READ_ATTEMPTS = 5
_READ_RETRY_SECONDS = 0.05


class StoreError(Exception):
    """Base class of store errors."""


class InvalidAdapterIdError(StoreError, ValueError):
    def __init__(self, adapter_id: str) -> None:
        super().__init__(
            f"adapter id {adapter_id!r} must match ^[A-Za-z0-9][A-Za-z0-9._-]{{0,127}}$ "
            "and contain no '..'"
        )
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
    `flora_server.adapters.stores` picks one from the settings."""

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
    # Make the rename itself durable; not every platform allows opening a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(
    directory: Path, final: Path, data: BinaryIO, expected: str | None
) -> tuple[str, int]:
    """Copy `data` to a temp file in `directory` hashing as it goes, fsync, check the digest,
    rename over `final`. Returns (sha256 hex, size)."""
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            actual, size = copy_hashing(data, out)
            out.flush()
            os.fsync(out.fileno())
        if expected is not None and expected.lower() != actual:
            raise DigestMismatchError(expected, actual)
        os.replace(tmp, final)
        return actual, size
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class LocalAdapterStore:
    """An `AdapterStore` on a local (or shared ReadWriteMany) directory."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()

    def _path(self, adapter_id: str, suffix: str = SUFFIX) -> Path:
        if not is_valid_adapter_id(adapter_id):
            raise InvalidAdapterIdError(adapter_id)
        path = self.root / f"{adapter_id}{suffix}"
        # resolve() follows symlinks: a link to anywhere outside the root is refused.
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise UnsafePathError(f"{path} resolves outside the adapter store")
        return path

    def put(self, adapter_id: str, data: BinaryIO, *, sha256: str | None = None) -> StoredAdapter:
        path = self._path(adapter_id)
        digest_path = self._path(adapter_id, DIGEST_SUFFIX)
        digest, size = _write_atomic(self.root, path, data, sha256)
        # The digest file follows the data; readers in this process hold the registry lock,
        # so they never see the two out of step.
        with _bytes_io(f"{digest}\n".encode()) as f:
            _write_atomic(self.root, digest_path, f, None)
        _fsync_dir(self.root)
        return StoredAdapter(adapter_id, digest, size, path.stat().st_mtime)

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

    def _copy_verified(self, adapter_id: str) -> StoredCopy:
        for attempt in range(_READ_ATTEMPTS):
            expected = self.digest(adapter_id)
            path = self._existing(adapter_id)
            fd, tmp_name = tempfile.mkstemp(prefix=".tmp-read-", dir=self.root)
            tmp = Path(tmp_name)
            try:
                with path.open("rb") as src, os.fdopen(fd, "wb") as out:
                    actual, size = copy_hashing(src, out)
            except FileNotFoundError:  # deleted between the digest read and the open
                tmp.unlink(missing_ok=True)
                raise StoredAdapterMissingError(adapter_id) from None
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            if actual == expected:
                return StoredCopy(tmp, actual, size)
            tmp.unlink(missing_ok=True)
            if attempt < _READ_ATTEMPTS - 1:
                time.sleep(_READ_RETRY_SECONDS)  # a writer in another process, mid-put
        raise DigestMismatchError(expected, actual)

    def delete(self, adapter_id: str) -> bool:
        path = self._path(adapter_id)
        existed = path.exists()
        path.unlink(missing_ok=True)
        self._path(adapter_id, DIGEST_SUFFIX).unlink(missing_ok=True)
        _fsync_dir(self.root)
        return existed

    def list(self) -> list[str]:
        ids = []
        for entry in self.root.iterdir():
            name = entry.name
            if not name.endswith(SUFFIX):
                continue
            adapter_id = name[: -len(SUFFIX)]
            if not is_valid_adapter_id(adapter_id):
                continue
            try:
                self._path(adapter_id)
            except UnsafePathError:
                continue
            ids.append(adapter_id)
        return sorted(ids)

    def exists(self, adapter_id: str) -> bool:
        try:
            return self._path(adapter_id).is_file()
        except (InvalidAdapterIdError, UnsafePathError):
            return False

    def digest(self, adapter_id: str) -> str:
        self._existing(adapter_id)
        digest_path = self._path(adapter_id, DIGEST_SUFFIX)
        try:
            return digest_path.read_text().strip()
        except FileNotFoundError:
            # Placed by hand (no digest file): trust the bytes as they are now.
            return sha256_file(self._path(adapter_id))

    def stat(self, adapter_id: str) -> StoredAdapter:
        path = self._existing(adapter_id)
        st = path.stat()
        return StoredAdapter(adapter_id, self.digest(adapter_id), st.st_size, st.st_mtime)

    def _existing(self, adapter_id: str) -> Path:
        path = self._path(adapter_id)
        if not path.is_file():
            raise StoredAdapterMissingError(adapter_id)
        return path


@contextlib.contextmanager
def _bytes_io(data: bytes) -> Iterator[BinaryIO]:
    import io

    with io.BytesIO(data) as f:
        yield f
