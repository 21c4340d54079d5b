"""When and how long to retry.

Three kinds of call, decided per method of the client (never guessed from the URL):

- ``IDEMPOTENT`` (GET, DELETE): repeating it is harmless. Retried on 429 and 503, on
  connection errors, and on read timeouts.
- ``REJECTED_ONLY`` (POST inference: generate, chat, complete, embed, classify): repeating it
  runs the model again but changes no server state. Retried only when the server provably
  did nothing: 429 (queue full, the request was rejected before it was queued), 503 (not
  ready), or a connection that could not be opened. Never after a timeout or a 5xx, when
  the work may have run.
- ``NEVER`` (POST /v1/adapters): an upload changes the store and may be large, so it is
  not repeated behind the caller's back; the error carries ``retry_after`` instead.

Delay before retry ``n`` (0-based), "full jitter" exponential backoff:

    backoff_n = uniform(0, min(max_delay, base_delay * 2**n))
    delay_n   = max(retry_after, backoff_n) + uniform(0, jitter * retry_after)

so a ``Retry-After`` from the server is a floor (with a little jitter on top, so that many
clients told "1 second" do not return in the same millisecond). A ``Retry-After`` longer
than ``max_retry_after`` is not waited for: the error is raised at once.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["RetryKind", "RetryPolicy"]


class RetryKind(enum.Enum):
    IDEMPOTENT = "idempotent"
    REJECTED_ONLY = "rejected_only"
    NEVER = "never"


RETRYABLE_STATUS = frozenset({429, 503})


@dataclass(frozen=True)
class RetryPolicy:
    """Retry settings. ``max_retries`` counts retries, so a call makes at most
    ``max_retries + 1`` attempts. ``rand`` is injectable for tests."""

    max_retries: int = 3
    base_delay: float = 0.25
    max_delay: float = 8.0
    jitter: float = 0.1
    max_retry_after: float = 60.0
    rand: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.base_delay < 0 or self.max_delay < 0 or self.jitter < 0:
            raise ValueError("delays and jitter must be >= 0")

    def retries_status(self, kind: RetryKind, status: int) -> bool:
        """Whether an answer with this status may be retried for a call of this kind."""
        return kind is not RetryKind.NEVER and status in RETRYABLE_STATUS

    def retries_transport(self, kind: RetryKind, *, connect_failed: bool) -> bool:
        """Whether a transport failure may be retried. ``connect_failed``: no byte was sent."""
        if kind is RetryKind.IDEMPOTENT:
            return True
        return kind is RetryKind.REJECTED_ONLY and connect_failed

    def delay(self, attempt: int, retry_after: float | None = None) -> float | None:
        """Seconds to sleep before retry ``attempt`` (0-based), or None to give up."""
        if attempt >= self.max_retries:
            return None
        if retry_after is not None and retry_after > self.max_retry_after:
            return None
        backoff = self.rand() * min(self.max_delay, self.base_delay * (2**attempt))
        if retry_after is None:
            return backoff
        return max(retry_after, backoff) + self.rand() * self.jitter * retry_after
