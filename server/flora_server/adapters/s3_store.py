"""An `AdapterStore` in S3-compatible object storage (AWS S3, MinIO, R2, ...).

Layout under `s3://<bucket>/<prefix>`:

    <prefix>manifests/<id>.json              the commit record: {"id", "sha256", "size_bytes",
                                             "created"}; an adapter exists iff this exists
    <prefix>objects/<id>/<sha256>.flora      the single-file adapter, content-addressed

Why a manifest: S3 has no rename, and a reader must never see half of a write. A put uploads
the weights object first (under a key no reader looks at yet: its digest is new), then writes
the small manifest last. One PUT of one object is atomic, so a reader sees either the old
manifest (and the old object, still there) or the new one. An overwrite then deletes the old
object; a reader that read the old manifest just before gets NoSuchKey for the object and
re-reads the manifest (`_ATTEMPTS` times). A delete removes the manifest first (the adapter is
gone at that instant), then the objects. Every read checks the object's sha256 against the
manifest, so a torn or tampered object is refused, never served.

A writer that dies between the two PUTs leaves an orphan object and the old manifest: readers
see the old adapter, whole; the orphan is removed by the next put or delete of that id. One
that dies after the manifest PUT leaves the old object behind, removed the same way. An id
`org/name` is the key path `manifests/org/name.json`, its objects `objects/org/name/`; the
objects of an id are the keys directly under its folder, so those of `org` never include
those of `org/name`.

Every failure of the bucket or of the way to it (no route to the endpoint, a stalled
connection, S3 answering an error other than "not found") leaves this module as an
`S3StoreError`, a `StoreUnavailableError`: botocore's own exception types never reach the
callers (`_s3_errors` is the one place they are translated). The client's connect/read
timeouts and attempts are settings (`make_s3_client`), so a stalled endpoint fails a call
in bounded time.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError

from flora_server.adapters.store import (
    DigestMismatchError,
    InvalidAdapterIdError,
    StoredAdapter,
    StoredAdapterMissingError,
    StoredCopy,
    StoreUnavailableError,
    copy_hashing,
    crash_point,
)
from flora_server.adapters.store_io import StoreExecutor
from flora_server.ids import is_valid_adapter_id, parse_s3_url

__all__ = ["S3AdapterStore", "S3StoreError", "make_s3_client", "parse_s3_url"]

_ATTEMPTS = 3
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MANIFESTS = "manifests/"
_OBJECTS = "objects/"
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


# What boto3 and botocore raise: connection and timeout errors (BotoCoreError), S3's error
# answers (ClientError), failed managed uploads (S3UploadFailedError, a Boto3Error).
_BOTO_ERRORS = (BotoCoreError, ClientError, Boto3Error)


class S3StoreError(StoreUnavailableError):
    """The bucket could not be reached, or answered with something other than the object
    or 'not found'. `reason` names the cause as a client may see it: the endpoint error's
    class (`EndpointConnectionError`, `ReadTimeoutError`) or S3's error code."""

    @classmethod
    def wrap(cls, what: str, exc: Exception) -> S3StoreError:
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code") or "unknown"
            reason = f"S3 answered {code}"
        else:
            reason = type(exc).__name__
        return cls(f"{what}: {type(exc).__name__}: {exc}", reason=reason)


@contextlib.contextmanager
def _s3_errors(what: str) -> Iterator[None]:
    """Re-raise boto3's and botocore's errors as `S3StoreError` naming `what` failed."""
    try:
        yield
    except _BOTO_ERRORS as exc:
        raise S3StoreError.wrap(what, exc) from exc


def make_s3_client(
    endpoint_url: str | None = None,
    *,
    connect_timeout: float = 3.0,
    read_timeout: float = 10.0,
    max_attempts: int = 3,
) -> Any:
    """A boto3 S3 client; credentials and region come from the standard AWS environment
    (env vars, shared config, IRSA / workload identity). The timeouts (settings
    `s3_connect_timeout`, `s3_read_timeout`, `s3_max_attempts`) are short so a stalled
    store fails a call instead of hanging the loader, the recheck or a store worker:
    `read_timeout` bounds each socket read (not a whole transfer), and one call takes at
    most about `max_attempts * (connect_timeout + read_timeout)` plus backoff."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"total_max_attempts": max_attempts, "mode": "standard"},
        # MinIO and most S3-compatibles want path-style addressing.
        s3={"addressing_style": "path"} if endpoint_url else {},
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def _is_missing(exc: BaseException) -> bool:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    return code in _MISSING_CODES


class S3AdapterStore:
    """See the module docstring. `client` is a boto3 S3 client (thread-safe, shared by the
    loader threads); `scratch_dir` holds local copies while they are being read;
    `executor` runs the calls made for requests (`flora_server.adapters.store_io`)."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        scratch_dir: Path,
        page_size: int = 1000,
        executor: StoreExecutor | None = None,
    ) -> None:
        self.executor = executor or StoreExecutor()
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.page_size = page_size
        scratch_dir.mkdir(parents=True, exist_ok=True)
        self.scratch_dir = scratch_dir

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        scratch_dir: Path,
        client: Any,
        executor: StoreExecutor | None = None,
    ) -> S3AdapterStore:
        bucket, prefix = parse_s3_url(url)
        return cls(client, bucket, prefix, scratch_dir=scratch_dir, executor=executor)

    # -- keys ----------------------------------------------------------------------------
    def _check(self, adapter_id: str) -> str:
        if not is_valid_adapter_id(adapter_id):
            raise InvalidAdapterIdError(adapter_id)
        return adapter_id

    def _manifest_key(self, adapter_id: str) -> str:
        return f"{self.prefix}{_MANIFESTS}{self._check(adapter_id)}.json"

    def _object_key(self, adapter_id: str, sha256: str) -> str:
        return f"{self.prefix}{_OBJECTS}{self._check(adapter_id)}/{sha256}.flora"

    # -- reads ---------------------------------------------------------------------------
    def _get(self, key: str, what: str, **kwargs: Any) -> dict[str, Any] | None:
        """`get_object`'s response for `key`, or None when the bucket says it does not
        exist; any other failure is an S3StoreError naming `what` was being read."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key, **kwargs)
        except _BOTO_ERRORS as exc:
            if _is_missing(exc):
                return None
            raise S3StoreError.wrap(f"reading {what}", exc) from exc

    def _body(self, key: str, what: str) -> Any | None:
        """The streaming body of `key`, or None when it does not exist (`_get`)."""
        response = self._get(key, what)
        return None if response is None else response["Body"]

    # -- manifest ------------------------------------------------------------------------
    def _manifest(self, adapter_id: str) -> dict[str, Any] | None:
        """The committed manifest, or None when there is none (or it is not one of ours)."""
        body = self._body(self._manifest_key(adapter_id), f"the manifest of {adapter_id!r}")
        if body is None:
            return None
        try:
            with _s3_errors(f"reading the manifest of {adapter_id!r}"):
                raw = body.read(64 * 1024)
            manifest = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        # A manifest names its own id and a well-formed digest, or it does not count.
        if (
            not isinstance(manifest, dict)
            or manifest.get("id") != adapter_id
            or not _HEX64.fullmatch(str(manifest.get("sha256", "")))
            or not isinstance(manifest.get("size_bytes"), int)
        ):
            return None
        return manifest

    def _required(self, adapter_id: str) -> dict[str, Any]:
        manifest = self._manifest(adapter_id)
        if manifest is None:
            raise StoredAdapterMissingError(adapter_id)
        return manifest

    @staticmethod
    def _stored(manifest: dict[str, Any]) -> StoredAdapter:
        return StoredAdapter(
            manifest["id"],
            manifest["sha256"],
            manifest["size_bytes"],
            float(manifest.get("created", 0.0)),
        )

    # -- AdapterStore --------------------------------------------------------------------
    def put(self, adapter_id: str, data: BinaryIO, *, sha256: str | None = None) -> StoredAdapter:
        manifest_key = self._manifest_key(adapter_id)
        with self._spool(data) as (path, digest, size):
            if sha256 is not None and sha256.lower() != digest:
                raise DigestMismatchError(sha256, digest)
            object_key = self._object_key(adapter_id, digest)
            # 1. the weights, under a key no committed manifest names yet
            with _s3_errors(f"uploading {adapter_id!r}"):
                self.client.upload_file(str(path), self.bucket, object_key)
        crash_point("object-written")
        manifest = {"id": adapter_id, "sha256": digest, "size_bytes": size, "created": time.time()}
        # 2. the commit: one small PUT, atomic for readers
        with _s3_errors(f"committing {adapter_id!r}"):
            self.client.put_object(
                Bucket=self.bucket,
                Key=manifest_key,
                Body=json.dumps(manifest, sort_keys=True).encode(),
                ContentType="application/json",
            )
        crash_point("committed")
        # 3. the old weights (and orphans of crashed writers) are no longer reachable; the
        # manifest is read again so that a concurrent writer's newer commit keeps its object
        current = self._manifest(adapter_id)
        keep = {object_key}
        if current is not None:
            keep.add(self._object_key(adapter_id, current["sha256"]))
        self._delete_objects(adapter_id, keep=keep)
        return self._stored(manifest)

    def read_prefix(self, adapter_id: str, nbytes: int) -> tuple[str, bytes]:
        for _ in range(_ATTEMPTS):
            digest = self._required(adapter_id)["sha256"]
            key = self._object_key(adapter_id, digest)
            response = self._get(key, repr(adapter_id), Range=f"bytes=0-{max(nbytes, 1) - 1}")
            if response is None:
                continue  # replaced meanwhile: read the manifest again
            with _s3_errors(f"reading {adapter_id!r}"):
                return digest, response["Body"].read(nbytes)
        raise StoredAdapterMissingError(adapter_id)

    @contextlib.contextmanager
    def checkout(self, adapter_id: str) -> Iterator[StoredCopy]:
        copy = self._fetch(adapter_id)
        try:
            yield copy
        finally:
            copy.path.unlink(missing_ok=True)

    def get_bytes(self, adapter_id: str) -> bytes:
        with self.checkout(adapter_id) as copy:
            return copy.path.read_bytes()

    @contextlib.contextmanager
    def local_path(self, adapter_id: str) -> Iterator[Path]:
        with self.checkout(adapter_id) as copy:
            yield copy.path

    def delete(self, adapter_id: str) -> bool:
        existed = self._manifest(adapter_id) is not None
        # The manifest first: from this instant no reader can find the adapter.
        with _s3_errors(f"deleting {adapter_id!r}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._manifest_key(adapter_id))
        self._delete_objects(adapter_id, keep=set())
        return existed

    def list(self) -> list[str]:
        """Every committed id, sorted; pages of `page_size` keys (S3 returns at most 1000)."""
        start = f"{self.prefix}{_MANIFESTS}"
        ids = []
        for key in self._keys(start):
            name = key[len(start) :]
            if not name.endswith(".json"):
                continue
            adapter_id = name[: -len(".json")]
            if is_valid_adapter_id(adapter_id):
                ids.append(adapter_id)
        # Key order is byte order of "<id>.json", which is not id order ("a-b" vs "a").
        return sorted(ids)

    def exists(self, adapter_id: str) -> bool:
        if not is_valid_adapter_id(adapter_id):
            return False
        return self._manifest(adapter_id) is not None

    def digest(self, adapter_id: str) -> str:
        return str(self._required(adapter_id)["sha256"])

    def stat(self, adapter_id: str) -> StoredAdapter:
        return self._stored(self._required(adapter_id))

    # -- internals -----------------------------------------------------------------------
    def _keys(self, prefix: str) -> builtins.list[str]:  # `list` here is the method
        with _s3_errors("listing the bucket"):
            paginator = self.client.get_paginator("list_objects_v2")
            pages = paginator.paginate(
                Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": self.page_size}
            )
            return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def _delete_objects(self, adapter_id: str, keep: set[str]) -> None:
        prefix = f"{self.prefix}{_OBJECTS}{self._check(adapter_id)}/"
        for key in self._keys(prefix):
            # Only the id's own objects: `objects/org/x.flora`, not `objects/org/name/...`.
            if key not in keep and "/" not in key[len(prefix) :]:
                with _s3_errors(f"deleting an old object of {adapter_id!r}"):
                    self.client.delete_object(Bucket=self.bucket, Key=key)

    @contextlib.contextmanager
    def _spool(self, data: BinaryIO) -> Iterator[tuple[Path, str, int]]:
        """Copy `data` to a scratch file, hashing it: the digest names the object key, so
        it must be known before the upload starts."""
        fd, name = tempfile.mkstemp(prefix=".put-", dir=self.scratch_dir)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                digest, size = copy_hashing(data, out)
            yield path, digest, size
        finally:
            path.unlink(missing_ok=True)

    def _fetch(self, adapter_id: str) -> StoredCopy:
        """Download the committed object to a scratch file and check its digest. An object
        that vanished under us was replaced or deleted: read the manifest again."""
        for attempt in range(_ATTEMPTS):
            manifest = self._required(adapter_id)
            expected = manifest["sha256"]
            body = self._body(self._object_key(adapter_id, expected), repr(adapter_id))
            if body is None:
                if attempt < _ATTEMPTS - 1:
                    continue
                raise StoredAdapterMissingError(adapter_id)
            fd, name = tempfile.mkstemp(prefix=".get-", dir=self.scratch_dir)
            path = Path(name)
            try:
                with os.fdopen(fd, "wb") as out, _s3_errors(f"downloading {adapter_id!r}"):
                    actual, size = copy_hashing(body, out)
                if actual != expected:
                    raise DigestMismatchError(expected, actual)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            return StoredCopy(path, actual, size)
        raise StoredAdapterMissingError(adapter_id)  # pragma: no cover (loop always returns)
