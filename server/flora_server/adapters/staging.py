"""Staging space: crash leftovers swept away, and a cap on what uploads in progress may hold.

Uploads are staged on local disk before they are validated and stored, and the stores write
through temp files (docs/architecture.md). A process killed mid-upload or mid-write leaves
those files behind for good. What counts as staging, by name, in the staging root (the
directory store's root, or an S3 store's scratch directory):

    <root>/.tmp-*              LocalAdapterStore: writes in progress, private read copies
    <root>/.put-*, .get-*      S3AdapterStore: scratch copies of uploads and downloads
    <root>/.uploads/.up-*      AdapterRegistry: staged upload parts and packed adapters

A file is a leftover when it was not modified for `stale_seconds`: files being written are
modified continuously and read copies live for one load, so a fresh file may belong to a
request in flight (of this process or of another replica on a shared volume) and is never
touched. `StagingJanitor` sweeps once when the server starts and then periodically.

`StagingBudget` bounds the bytes the uploads being received hold at once (each upload is
also capped alone by `max_upload_bytes`): an upload that would pass it is refused while it
streams, so concurrent uploads cannot fill the disk.
"""

from __future__ import annotations

import logging
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

STAGING_PATTERNS: dict[str, tuple[str, ...]] = {
    ".": (".tmp-*", ".put-*", ".get-*"),
    ".uploads": (".up-*",),
}
UPLOADS_DIR = ".uploads"
_MAX_SWEEP_PERIOD = 300.0


@dataclass(frozen=True)
class SweepResult:
    files: int
    bytes: int


def sweep_stale(root: Path, stale_seconds: float, *, now: float | None = None) -> SweepResult:
    """Remove the staging files under `root` (see `STAGING_PATTERNS`) not modified for
    `stale_seconds`. Files that vanish meanwhile (their request finished) are skipped."""
    cutoff = (time.time() if now is None else now) - stale_seconds
    files = size = 0
    for sub, patterns in STAGING_PATTERNS.items():
        directory = root / sub
        if not directory.is_dir():
            continue
        for pattern in patterns:
            for path in directory.glob(pattern):
                try:
                    st = path.lstat()
                    if not stat.S_ISREG(st.st_mode) or st.st_mtime > cutoff:
                        continue
                    path.unlink()
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    logger.warning("could not remove stale staging file %s: %s", path, exc)
                    continue
                files += 1
                size += st.st_size
    return SweepResult(files, size)


class StagingJanitor:
    """Sweeps `root` every `stale_seconds / 4` (at most 5 minutes) once started; the owner
    calls `sweep` itself at start-up, before requests are served."""

    def __init__(self, root: Path, stale_seconds: float) -> None:
        self.root = root
        self.stale_seconds = stale_seconds
        self.period = min(stale_seconds / 4, _MAX_SWEEP_PERIOD)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> SweepResult:
        result = sweep_stale(self.root, self.stale_seconds)
        if result.files:
            logger.warning(
                "removed %d stale staging files (%d bytes, untouched for over %.0f s) in %s",
                result.files,
                result.bytes,
                self.stale_seconds,
                self.root,
            )
        return result

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="flora-staging-janitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.sweep()
            except Exception:
                logger.exception("staging sweep failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class StagingFullError(Exception):
    """The uploads in progress already hold the staging budget."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the server's upload staging space ({limit} bytes) is in use by other uploads; "
            "retry later"
        )
        self.limit = limit


class StagingBudget:
    """Bytes held by uploads being received, across all requests of this process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    def hold(self) -> StagingHold:
        """A hold for one upload; `release()` it when its staged files are gone."""
        return StagingHold(self)

    def _take(self, n: int) -> None:
        with self._lock:
            if self._used + n > self.limit:
                raise StagingFullError(self.limit)
            self._used += n

    def _give(self, n: int) -> None:
        with self._lock:
            self._used -= n


class StagingHold:
    """One upload's share of a `StagingBudget`."""

    def __init__(self, budget: StagingBudget) -> None:
        self.budget = budget
        self.bytes = 0

    def add(self, n: int) -> None:
        """Charge `n` more bytes; `StagingFullError` when the budget has no room."""
        self.budget._take(n)
        self.bytes += n

    def release(self) -> None:
        self.budget._give(self.bytes)
        self.bytes = 0
