"""Connection-level defences under uvicorn: a header-read timeout and the probe listener.

uvicorn bounds the idle time between requests on a kept-alive connection
(`timeout_keep_alive`), but not the time a client may take to send a request head: a
connection that sends nothing, or one byte a second (slowloris), holds its place forever,
and enough of them fill `--max-connections` so that every route answers 503. The protocol
class below closes a connection whose request line and headers are not complete within
`header_timeout` seconds, counted from the connect or from the first byte of the next request
on a kept-alive connection. A client that sent part of a head gets `408` before the close.

Probes share nothing with the main listener when `--probe-port` is set: a second uvicorn
server on that port serves only `/health` and `/ready` (everything else is 404), with its own
small connection cap, so an exhausted main port cannot make Kubernetes restart a healthy pod.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

PROBE_PATHS = frozenset({"/health", "/ready"})
# Probes come from the kubelet (one at a time per probe kind) and operators: a few dozen
# connections are plenty, and the cap keeps a flood on this port from growing unbounded.
PROBE_MAX_CONNECTIONS = 64
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
)


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a timer on the request head (`header_timeout` seconds)."""

    header_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        # A new request starts: the first bytes after a response (or after the connect).
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()
        if self.conn.their_state is h11.IDLE:
            self._head_bytes += len(data)
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is complete (or an error)
            self._disarm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._head_bytes:
            log.debug(
                "request head not complete after %.1f s (%d bytes): closing %s",
                self.header_timeout,
                self._head_bytes,
                _peer(self.client),
            )
            self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutH11Protocol]:
    """The protocol class for uvicorn's `http=` with its head timeout set to `seconds`."""
    return type(
        "HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout": seconds}
    )


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"


class ProbeOnlyApp:
    """ASGI app for the probe listener: `/health` and `/ready` go to the main app (same
    state, same answers); every other path is a JSON 404, so the port exposes nothing else."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {
                "error": {
                    "type": "not_found_error",
                    "message": "the probe port serves only /health and /ready",
                }
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 404, "headers": headers})
        await send({"type": "http.response.body", "body": body})
