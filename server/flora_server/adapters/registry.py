"""The adapter registry: validated uploads into the store, validated loads out of it.

The registry is the engine's `AdapterSource` and the adapter API's back end. It never
touches the model: validation is a callable built once the base is loaded (by the engine
builders of `flora_server.bootstrap`, handed over in `flora_server.main`), which reads an
adapter file and checks it against the base's module table and fingerprint.

Uploads come in two forms and are stored in one, the single-file form of
`flora.adapter.archive`: a two-file upload (config + weights) is packed into it by
`pack_single_file`, so the same two files always give the same stored bytes. The library
owns the format (header cap, strict JSON); its `AdapterError`s reach callers as
`AdapterValidationError`.

One store may be shared by servers of different base models (the default store is
`$FLORA_HOME/adapters` for every model). Each server sees only the adapters of its own base,
as `ownership.BaseOwnership` decides from each adapter's own header. Another base's adapter
is left out of listings, and a lookup, delete or overwrite of it raises
`AdapterOfOtherBaseError`, which names the base it was trained for. Nothing is moved or
rewritten, so existing stores, local or S3, need no migration.

Handlers on the event loop run the registry's blocking methods through `call`, on the
store's own bounded executor (`flora_server.adapters.store_io`), never on asyncio's default
executor. A store that cannot be reached raises `StoreUnavailableError` (503 in the API);
on the engine's load path it arrives as `AdapterStoreUnavailableError`, an engine error
that is also a `StoreUnavailableError`, so the API maps both the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from flora.adapter.archive import pack_single_file, read_embedded_config
from flora.errors import AdapterError
from flora_server.adapters.ownership import BaseOwnership
from flora_server.adapters.store import (
    AdapterStore,
    DigestMismatchError,
    StoredAdapter,
    StoredAdapterMissingError,
    StoreError,
    StoreUnavailableError,
    sha256_file,
)
from flora_server.engine.protocol import (
    AdapterLoadError,
    AdapterNotFoundError,
    AdapterOfOtherBaseError,
    LoadedAdapter,
)

if TYPE_CHECKING:
    from flora.adapter import Adapter

logger = logging.getLogger(__name__)

T = TypeVar("T")

AdapterValidator = Callable[[Path], "Adapter"]
"""Reads the single-file adapter at a path and validates it against the loaded base;
raises `AdapterValidationError` when it does not fit. A validator that also has
`foreign_base(config) -> str | None` and `base_name` (as `BaseValidator`) lets the registry
tell adapters of other bases apart in a shared store; without them every adapter is taken
as this base's."""


class BaseNotLoadedError(Exception):
    """Which adapters belong to this server is known once its base model is loaded."""


class AdapterStoreUnavailableError(AdapterLoadError, StoreUnavailableError):
    """A load failed because the store could not be reached: an engine error (the engine
    passes it to the request as it is) that the API answers as any `StoreUnavailableError`
    (503), not as a broken adapter (500)."""

    def __init__(self, adapter_id: str, cause: StoreUnavailableError) -> None:
        StoreUnavailableError.__init__(
            self, f"loading adapter {adapter_id!r}: {cause}", reason=cause.reason
        )


class AdapterValidationError(Exception):
    """The adapter is malformed or does not fit the loaded base."""


class AdapterConflictError(Exception):
    def __init__(self, adapter_id: str) -> None:
        super().__init__(
            f"adapter {adapter_id!r} exists with different bytes; use ?overwrite=true to replace"
        )
        self.adapter_id = adapter_id


class UploadDigestError(Exception):
    """The client's `sha256` field does not match what it sent."""


@dataclass(frozen=True)
class StagedUpload:
    """Upload parts already written to local temp files (with their sha256)."""

    archive: Path | None = None
    archive_sha256: str | None = None
    config: Path | None = None
    weights: Path | None = None
    weights_sha256: str | None = None


@dataclass(frozen=True)
class PutResult:
    stored: StoredAdapter
    status: Literal["created", "unchanged", "replaced"]


@contextlib.contextmanager
def library_errors() -> Iterator[None]:
    """Re-raise the library's `AdapterError` (a file that breaks the format: the header
    cap, strict JSON, a missing config) as `AdapterValidationError`, with its message."""
    try:
        yield
    except AdapterError as exc:
        raise AdapterValidationError(str(exc)) from exc


class AdapterRegistry:
    """Adapters by id: validated uploads, listing, deletion, and `AdapterSource.load`."""

    def __init__(self, store: AdapterStore, staging_dir: Path, *, exists_ttl: float = 0.0) -> None:
        """`exists_ttl`: seconds a positive answer of `exists` may be reused (for a remote
        store, where each answer is a round trip; keep it at or below the store recheck
        interval). Negative answers are never cached: an adapter uploaded through another
        replica is usable here at once, and unknown ids cannot grow the cache. This replica's
        own puts and deletes update it at once."""
        self.store = store
        self.exists_ttl = exists_ttl
        self._exists_cache: dict[str, tuple[float, bool]] = {}
        # Digest of the bytes each `load` validated, per id: what this replica may be serving.
        self._served: dict[str, str] = {}
        self.staging_dir = staging_dir
        staging_dir.mkdir(parents=True, exist_ok=True)
        self._validator: AdapterValidator | None = None
        self._ownership: BaseOwnership | None = None
        # One lock for writes and digest-checked reads: a load never sees the data file and
        # its digest out of step. Adapters are small; contention is not a concern.
        self._lock = threading.RLock()
        self._requests: Counter[str] = Counter()
        self._loads: Counter[str] = Counter()

    # -- set up -----------------------------------------------------------------------
    async def call(self, fn: Callable[..., T], /, *args: Any, bounded: bool = True) -> T:
        """`fn(*args)`, a blocking registry or store call made for a request, on the store's
        executor: bounded by `store_timeout` (`StoreUnavailableError` past it), and unable
        to take threads from other work. `bounded=False` for uploads (see `StoreExecutor`)."""
        return await self.store.executor.run(fn, *args, bounded=bounded)

    def set_validator(self, validator: AdapterValidator) -> None:
        """Install the validator once the base model is known."""
        judge = getattr(validator, "foreign_base", None)
        self._ownership = None if judge is None else BaseOwnership(self.store, judge)
        self._validator = validator

    @property
    def can_validate(self) -> bool:
        return self._validator is not None

    def _validate(self, path: Path) -> Adapter:
        if self._validator is None:
            raise RuntimeError("no validator: the base model is not loaded yet")
        return self._validator(path)

    # -- bases --------------------------------------------------------------------------
    def foreign_base(self, adapter_id: str) -> str | None:
        """The base model the stored `adapter_id` was trained for when that is not this
        server's base, else None. Raises `StoredAdapterMissingError` when it is not stored
        and `BaseNotLoadedError` before the base is known."""
        if self._validator is None:
            raise BaseNotLoadedError("the base model is still loading")
        if self._ownership is None:
            return None
        return self._ownership.foreign_base(adapter_id)

    def require(self, adapter_id: str) -> None:
        """Raise `AdapterNotFoundError` unless `adapter_id` is stored for this base
        (`AdapterOfOtherBaseError` when it is stored for another)."""
        try:
            other = self.foreign_base(adapter_id)
        except StoredAdapterMissingError:
            raise AdapterNotFoundError(adapter_id) from None
        if other is not None:
            raise AdapterOfOtherBaseError(adapter_id, other, self._base_name())

    def not_found(self, adapter_id: str) -> AdapterNotFoundError:
        """The error for an id that `exists` denied: `AdapterOfOtherBaseError` naming the
        base when another base's adapter holds the id, else `AdapterNotFoundError`."""
        try:
            self.require(adapter_id)
        except AdapterNotFoundError as exc:
            return exc
        except StoreUnavailableError:
            raise  # not "not found": the store could not say
        except (BaseNotLoadedError, StoreError, OSError):
            pass
        return AdapterNotFoundError(adapter_id)

    def _base_name(self) -> str:
        return str(getattr(self._validator, "base_name", None) or "this base")

    # -- AdapterSource ------------------------------------------------------------------
    def exists(self, adapter_id: str) -> bool:
        """Stored and of this server's base (before the base is loaded: stored)."""
        if self.exists_ttl > 0:
            cached = self._exists_cache.get(adapter_id)
            if cached is not None and time.monotonic() - cached[0] < self.exists_ttl:
                return cached[1]
        found = self.store.exists(adapter_id)
        if found and self._validator is not None:
            try:
                found = self.foreign_base(adapter_id) is None
            except StoredAdapterMissingError:
                found = False
        if self.exists_ttl > 0 and found:
            self._exists_cache[adapter_id] = (time.monotonic(), True)
        else:
            self._exists_cache.pop(adapter_id, None)
        return found

    def load(self, adapter_id: str) -> LoadedAdapter:
        """Read, digest-check and validate the stored adapter (engine loader thread). The
        digest of the validated bytes comes with it, and is remembered for `stale_ids`."""
        with self._lock:
            try:
                self.require(adapter_id)
                with self.store.checkout(adapter_id) as copy:
                    adapter = self._validate(copy.path)
            except StoreUnavailableError as exc:
                raise AdapterStoreUnavailableError(adapter_id, exc) from exc
            except StoredAdapterMissingError:
                raise AdapterNotFoundError(adapter_id) from None
            except (DigestMismatchError, AdapterValidationError) as exc:
                raise AdapterLoadError(f"adapter {adapter_id!r}: {exc}") from exc
            self._served[adapter_id] = copy.sha256
        self._loads[adapter_id] += 1
        return LoadedAdapter(adapter, copy.sha256)

    def stale_ids(self) -> list[str]:
        """Ids this replica loaded whose store entry has since been deleted or replaced
        (possibly through another replica). Each is forgotten here once reported, so the
        caller invalidates it once; its next `load` records the new digest. This
        replica's own puts and deletes leave the record in place, so the next pass
        invalidates once more: a copy of the old bytes that a racing load cached is dropped
        within the bound even then.

        Cost: one `store.digest` per loaded id (a small file read, or one GET of the S3
        manifest). A store error counts as stale: when the store cannot vouch for the
        cached bytes, they are dropped rather than served past the bound."""
        with self._lock:
            served = dict(self._served)
        stale = []
        for adapter_id, digest in served.items():
            try:
                current: str | None = self.store.digest(adapter_id)
            except StoredAdapterMissingError:
                current = None
            except (StoreError, OSError) as exc:
                logger.warning("store recheck of %s failed: %s", adapter_id, exc)
                current = None
            if current == digest:
                continue
            with self._lock:
                # A load that finished meanwhile recorded newer bytes: check those next time.
                if self._served.get(adapter_id) == digest:
                    del self._served[adapter_id]
                    stale.append(adapter_id)
            self._exists_cache.pop(adapter_id, None)
        return stale

    # -- uploads ------------------------------------------------------------------------
    @contextlib.contextmanager
    def staging_file(self, name: str) -> Iterator[Path]:
        """A temp file path in the staging directory, removed on exit."""
        fd, tmp = tempfile.mkstemp(prefix=f".up-{name}-", dir=self.staging_dir)
        os.close(fd)
        path = Path(tmp)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def put(
        self,
        adapter_id: str,
        upload: StagedUpload,
        *,
        overwrite: bool = False,
        expected_sha256: str | None = None,
    ) -> PutResult:
        """Validate and store an upload. Nothing is stored unless every check passes.

        `expected_sha256` is checked against the archive (single-file form) or against the
        weights file (two-file form), i.e. the bytes the client hashed.
        """
        with contextlib.ExitStack() as stack:
            if upload.archive is not None:
                path, digest = upload.archive, upload.archive_sha256 or ""
                client_digest_of = digest
            elif upload.config is not None and upload.weights is not None:
                path = stack.enter_context(self.staging_file("packed"))
                client_digest_of = upload.weights_sha256 or ""
                with library_errors():
                    digest = pack_single_file(upload.config, upload.weights, path)
            else:
                raise AdapterValidationError("send either `archive` or both `config` and `weights`")
            if expected_sha256 is not None and expected_sha256.lower() != client_digest_of:
                raise UploadDigestError(
                    f"sha256 mismatch: the field says {expected_sha256}, "
                    f"the bytes hash to {client_digest_of}"
                )
            self._validate(path)
            with self._lock:
                try:
                    other = self.foreign_base(adapter_id)
                    current: str | None = self.store.digest(adapter_id)
                except StoredAdapterMissingError:
                    other, current = None, None
                if other is not None:  # another base's adapter is never replaced
                    raise AdapterOfOtherBaseError(adapter_id, other, self._base_name())
                if current == digest:
                    return PutResult(self.store.stat(adapter_id), "unchanged")
                if current is not None and not overwrite:
                    raise AdapterConflictError(adapter_id)
                status: Literal["created", "replaced"] = (
                    "created" if current is None else "replaced"
                )
                with path.open("rb") as f:
                    stored = self.store.put(adapter_id, f, sha256=digest)
                # The caller invalidates its caches; `_served` keeps the old digest so the
                # next recheck pass invalidates once more (see `stale_ids`).
                self._exists_cache.pop(adapter_id, None)
        logger.info("adapter %s %s (sha256 %s)", adapter_id, status, digest)
        return PutResult(stored, status)

    def register_directory(self, adapter_id: str, directory: Path) -> PutResult:
        """Store an adapter from a local directory (`--adapter`), replacing a different one."""
        weights = directory / "adapter.safetensors"
        config = directory / "adapter_config.json"
        if directory.is_file():
            upload = StagedUpload(archive=directory, archive_sha256=sha256_file(directory))
        elif weights.is_file() and config.is_file():
            upload = StagedUpload(config=config, weights=weights)
        else:
            raise AdapterValidationError(
                f"{directory}: expected adapter_config.json and adapter.safetensors"
            )
        return self.put(adapter_id, upload, overwrite=True)

    # -- reads --------------------------------------------------------------------------
    def delete(self, adapter_id: str) -> bool:
        """Delete this base's `adapter_id`; False when it is not stored. Another base's
        adapter raises `AdapterOfOtherBaseError` and stays."""
        with self._lock:
            try:
                self.require(adapter_id)
            except AdapterOfOtherBaseError:
                raise
            except AdapterNotFoundError:
                return False
            self._exists_cache.pop(adapter_id, None)
            return self.store.delete(adapter_id)

    def list_ids(self) -> list[str]:
        """This base's stored ids, sorted (`BaseNotLoadedError` before the base is known)."""
        ids = []
        for adapter_id in self.store.list():
            try:
                if self.foreign_base(adapter_id) is None:
                    ids.append(adapter_id)
            except StoredAdapterMissingError:  # deleted meanwhile
                continue
        return ids

    def stat(self, adapter_id: str) -> StoredAdapter:
        """Raises `AdapterNotFoundError` (or `AdapterOfOtherBaseError`)."""
        self.require(adapter_id)
        try:
            return self.store.stat(adapter_id)
        except StoredAdapterMissingError:  # deleted meanwhile
            raise AdapterNotFoundError(adapter_id) from None

    def config(self, adapter_id: str) -> dict[str, Any]:
        self.require(adapter_id)
        try:
            with self.store.local_path(adapter_id) as path, library_errors():
                return read_embedded_config(path)
        except StoredAdapterMissingError:
            raise AdapterNotFoundError(adapter_id) from None

    def count_request(self, adapter_id: str) -> None:
        self._requests[adapter_id] += 1

    def request_count(self, adapter_id: str) -> int:
        return self._requests[adapter_id]

    def load_count(self, adapter_id: str) -> int:
        return self._loads[adapter_id]
