"""Where adapter bytes live: the `AdapterStore` protocol and a local-directory implementation.

A store keeps one object per adapter id: the single-file form (a safetensors file whose
`__metadata__["adapter_config"]` holds the config JSON, see docs/architecture.md) and its
sha256. Layout of `LocalAdapterStore`:

    <root>/<id>.flora          the adapter
    <root>/<id>.flora.sha256   its hex digest, checked on every read
    <root>/.tmp-*              writes in progress (same directory, so rename is atomic)

Ids are checked against the id pattern, and resolved paths must stay under the root: a
symlink that points outside is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from flora_server.settings import is_valid_adapter_id

_CHUNK = 1024 * 1024
SUFFIX = ".flora"
DIGEST_SUFFIX = ".flora.sha256"


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


class AdapterStore(Protocol):
    """Adapter bytes by id. Implementations: `LocalAdapterStore` (now), S3 (later)."""

    def put(self, adapter_id: str, data: BinaryIO, *, sha256: str | None = None) -> StoredAdapter:
        """Store `data` atomically under `adapter_id`, replacing any previous object. When
        `sha256` is given the bytes must hash to it, else `DigestMismatchError` and nothing
        changes."""
        ...

    def get_bytes(self, adapter_id: str) -> bytes: ...

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
        h = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out:
            while chunk := data.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        actual = h.hexdigest()
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
        path = self._existing(adapter_id)
        data = path.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        expected = self.digest(adapter_id)
        if actual != expected:
            raise DigestMismatchError(expected, actual)
        return data

    @contextlib.contextmanager
    def local_path(self, adapter_id: str) -> Iterator[Path]:
        path = self._existing(adapter_id)
        actual = sha256_file(path)
        expected = self.digest(adapter_id)
        if actual != expected:
            raise DigestMismatchError(expected, actual)
        yield path

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
