"""Which base each stored adapter was trained for, in a store that servers of different
base models may share.

The answer comes from the adapter's own header: the config embedded in it goes to a judge
(the validator's `foreign_base(config)`, which compares the fingerprint with this server's
base). It is read once per stored digest and remembered: the digest names the bytes, so an
overwrite is a new question, and nothing in the store is moved or rewritten.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flora.adapter.archive import embedded_config
from flora.adapter.container import header_from_prefix
from flora.errors import AdapterError
from flora_server.adapters.store import AdapterStore

BaseJudge = Callable[[dict[str, Any]], str | None]
"""An adapter's config JSON -> the base it was trained for when that is another base than
this server's, else None."""

# Bytes read to find an adapter's config in its header; a longer header is read whole.
HEADER_PROBE_BYTES = 64 * 1024
MAX_VERDICTS = 65536


class BaseOwnership:
    """The verdicts of one judge on a store's adapters, cached by content digest."""

    def __init__(
        self, store: AdapterStore, judge: BaseJudge, *, max_verdicts: int = MAX_VERDICTS
    ) -> None:
        self.store = store
        self.judge = judge
        self.max_verdicts = max_verdicts
        # sha256 of stored bytes -> the base they were trained for (None: this server's).
        self._verdicts: dict[str, str | None] = {}

    def foreign_base(self, adapter_id: str) -> str | None:
        """The base the stored `adapter_id` was trained for when that is not this server's,
        else None. An adapter whose header cannot be read is taken as this base's: its
        validation names the problem. Raises `StoredAdapterMissingError` when it is not
        stored."""
        digest = self.store.digest(adapter_id)
        if digest in self._verdicts:
            return self._verdicts[digest]
        digest, verdict = self._read_verdict(adapter_id)
        if len(self._verdicts) >= self.max_verdicts:
            self._verdicts.clear()
        self._verdicts[digest] = verdict
        return verdict

    def _read_verdict(self, adapter_id: str) -> tuple[str, str | None]:
        """(digest of the bytes read, the verdict on them): the header is read from one
        stored object, so the two belong together even if a put commits meanwhile."""
        digest, head = self.store.read_prefix(adapter_id, HEADER_PROBE_BYTES)
        try:
            header = header_from_prefix(head)
            if isinstance(header, int):  # a header longer than the probe: read it whole
                digest, head = self.store.read_prefix(adapter_id, header)
                header = header_from_prefix(head)
            if isinstance(header, int):  # truncated
                return digest, None
            return digest, self.judge(embedded_config(header))
        except AdapterError:
            return digest, None
