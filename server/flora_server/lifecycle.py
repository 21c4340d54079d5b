"""Process lifecycle around uvicorn: SIGTERM drain and exit on engine death.

SIGTERM (Kubernetes deleting the pod):
1. at once `app.state.draining` is set: `/ready` answers 503 (the endpoint is taken out of
   the Service), `/health` stays 200, new inference requests and adapter changes answer 503
   with Retry-After (listing and reading adapters still answer);
2. the listener stays open while running and queued requests and running adapter changes
   (an upload being stored) finish, for up to `FLORA_SHUTDOWN_TIMEOUT` seconds;
3. then the engine ends what is left with an error (`fail_in_flight`): a stream gets a final
   error event (and `data: [DONE]` in the OpenAI shape) and its body ends cleanly; a
   non-streaming request gets a 503;
4. then uvicorn shuts down: whatever still runs is cancelled (the handler's task is
   cancelled, which closes its event stream, which cancels the engine row), the lifespan
   stops the engine, and the process exits 0.

uvicorn's own handler would close the listener at once and, since 0.29, re-raise the signal
after shutting down (exit status 143); `DrainingServer` keeps the first SIGTERM to itself.
A second SIGTERM or a SIGINT takes uvicorn's usual path, except that what still runs first
ends with an error as in step 3 (`DrainingServer.shutdown`).

Connections: a request head must arrive within `--header-timeout` and a kept-alive connection
idles at most `--keep-alive-timeout` (`flora_server.connections`). With `--probe-port`, a
second listener in the same event loop serves `/health` and `/ready` only; it stops with the
main server.

If the engine worker dies (`engine.healthy` turns False) `/health` answers 503, and the
watchdog shuts the server down with exit status `ENGINE_DEAD_EXIT` so that a supervisor
(Kubernetes, systemd) restarts it even without a liveness probe. If start-up fails (a port
cannot be bound; the model, an `--adapter` or the KV pool cannot be set up:
`app.state.startup_error`) the process exits with `STARTUP_FAILED_EXIT`, rather than live
on unready, which Docker's health check and a liveness probe would call healthy.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from types import FrameType
from typing import Any, Literal

import uvicorn

from flora_server.connections import PROBE_MAX_CONNECTIONS, ProbeOnlyApp, header_timeout_protocol
from flora_server.engine.protocol import ENGINE_DEAD_EXIT

log = logging.getLogger(__name__)

STARTUP_FAILED_EXIT = 4
_POLL_SECONDS = 0.05
_FINAL_EVENT_SECONDS = 1.0  # after the shutdown timeout: for the engine to fail the rest


def in_flight(app: Any) -> int:
    """What the drain waits for: the engine's running plus waiting requests (none before it
    exists) and the adapter changes still running (`api.deps.adapter_change`)."""
    changes = int(getattr(app.state, "changes_in_flight", 0))
    engine = getattr(app.state, "engine", None)
    if engine is None:
        return changes
    stats = engine.stats()
    return int(stats.running) + int(stats.waiting) + changes


class DrainingServer(uvicorn.Server):
    """uvicorn.Server with a draining SIGTERM and an engine-death watchdog."""

    def __init__(
        self,
        config: uvicorn.Config,
        app: Any,
        shutdown_timeout: float,
        probe_config: uvicorn.Config | None = None,
    ) -> None:
        super().__init__(config)
        self.flora_app = app
        self.probe = None if probe_config is None else uvicorn.Server(probe_config)
        self.shutdown_timeout = shutdown_timeout
        self.exit_code = 0
        self._probe_sockets: Any = None  # the probe's bound socket, given to `run`
        self._draining = threading.Event()
        self._stop_watchdog = threading.Event()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self._draining.is_set():
            self.start_drain()
            return
        super().handle_exit(sig, frame)

    def start_drain(self) -> None:
        """Refuse new work now; stop the server once in-flight work is done (or timed out)."""
        self._draining.set()
        self.flora_app.state.draining = True
        log.warning("SIGTERM: draining (up to %.1f s)", self.shutdown_timeout)
        threading.Thread(target=self._drain, name="flora-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        while time.monotonic() < deadline and in_flight(self.flora_app) > 0:
            time.sleep(_POLL_SECONDS)
        left = in_flight(self.flora_app)
        if left:
            log.warning("shutdown timeout: ending %d requests with an error", left)
            self._fail_in_flight()
        self.should_exit = True

    def _fail_in_flight(self) -> None:
        """Have the engine end what still runs with an error (streams get a final error
        event and close cleanly), and give the handlers a moment to write it."""
        engine = getattr(self.flora_app.state, "engine", None)
        if engine is None:  # the model never finished loading: nothing runs
            return
        engine.fail_in_flight("the server is shutting down (FLORA_SHUTDOWN_TIMEOUT expired)")
        deadline = time.monotonic() + _FINAL_EVENT_SECONDS
        while time.monotonic() < deadline and in_flight(self.flora_app) > 0:
            time.sleep(_POLL_SECONDS)
        time.sleep(_POLL_SECONDS)  # the handlers write their final event on the loop

    async def shutdown(self, sockets: Any = None) -> None:
        """End what still runs with an error before uvicorn closes the connections: after
        a second SIGTERM, a SIGINT or the engine's death nothing has drained, and its
        handlers would be cancelled mid-answer (cut streams, plain-text 500s)."""
        engine = getattr(self.flora_app.state, "engine", None)
        if engine is not None and in_flight(self.flora_app):
            engine.fail_in_flight("the server is shutting down")
            await asyncio.sleep(_POLL_SECONDS)  # the handlers write their final events
        await super().shutdown(sockets)

    def watch_engine(self) -> None:
        """Start the watchdog thread (call before `run`)."""
        threading.Thread(target=self._watch, name="flora-watchdog", daemon=True).start()

    def _watch(self) -> None:
        while not self._stop_watchdog.wait(_POLL_SECONDS * 4):
            state = self.flora_app.state
            engine = getattr(state, "engine", None)
            starting = not getattr(state, "warmed", True)
            if engine is not None and not engine.healthy and not starting:
                log.critical("the engine worker died: exiting with status %d", ENGINE_DEAD_EXIT)
                self.exit_code = ENGINE_DEAD_EXIT
                self.should_exit = True
                return
            # A worker that dies while warming up is a failed start-up (`startup_error`).
            if getattr(state, "startup_error", None):
                log.critical("start-up failed: exiting with status %d", STARTUP_FAILED_EXIT)
                self.exit_code = STARTUP_FAILED_EXIT
                self.should_exit = True
                return

    async def serve(self, sockets: Any = None) -> None:
        probe, probe_task = self.probe, None
        if probe is not None:
            # Its own `_serve`: the signal handlers belong to the main server alone.
            probe_task = asyncio.create_task(probe._serve(self._probe_sockets))
        try:
            await super().serve(sockets)
        finally:
            if probe is not None and probe_task is not None:
                probe.should_exit = True
                await probe_task

    def run(self, sockets: Any = None, probe_sockets: Any = None) -> None:
        self._probe_sockets = probe_sockets
        try:
            super().run(sockets)
        finally:
            self._stop_watchdog.set()


def serve(app: Any, settings: Any) -> int:
    """Run `app` under uvicorn with flora's limits and lifecycle; returns the exit status."""
    config = _config(app, settings, settings.port, settings.max_connections, lifespan="on")
    probe = None
    if settings.probe_port is not None:
        probe = _config(ProbeOnlyApp(app), settings, settings.probe_port, PROBE_MAX_CONNECTIONS)
    # Both ports are bound before anything loads: one that is taken ends the process at
    # once, in one log line (uvicorn's), not after the model load or in a traceback.
    configs = [config] if probe is None else [config, probe]
    bound = [_listen(c) for c in configs]
    failed = [c for c, socks in zip(configs, bound, strict=True) if socks is None]
    if failed:
        for socks in bound:
            for sock in socks or ():
                sock.close()
        where = f"{failed[0].host}:{failed[0].port}"
        log.critical("cannot listen on %s: exiting with status %d", where, STARTUP_FAILED_EXIT)
        return STARTUP_FAILED_EXIT
    server = DrainingServer(config, app, settings.shutdown_timeout, probe)
    server.watch_engine()
    server.run(bound[0], bound[1] if probe is not None else None)
    return server.exit_code


def _listen(config: uvicorn.Config) -> list[socket.socket] | None:
    """Listening sockets for `config`'s host and port, one per address the host resolves
    to (as asyncio's `create_server(host=...)`, which uvicorn uses, binds them: `localhost`
    is 127.0.0.1 and ::1, IPv6 sockets are IPv6-only); None, after logging why, when one
    cannot be bound."""
    try:
        infos = socket.getaddrinfo(
            config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        log.error("cannot resolve %s: %s", config.host, exc)
        return None
    sockets: list[socket.socket] = []
    seen = set()
    for family, kind, proto, _, address in infos:
        if (family, address) in seen:
            continue
        seen.add((family, address))
        sock = socket.socket(family, kind, proto)
        sockets.append(sock)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
        except OSError as exc:
            log.error("cannot listen on %s: %s", address[:2], exc)
            for opened in sockets:
                opened.close()
            return None
    return sockets


def _config(
    app: Any,
    settings: Any,
    port: int,
    max_connections: int,
    lifespan: Literal["auto", "on", "off"] = "off",
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=port,
        log_level=settings.log_level,
        # Logging is flora's (observability.configure_logging: text or JSON, request ids);
        # its access log replaces uvicorn's.
        log_config=None,
        access_log=False,
        lifespan=lifespan,
        # h11 enforces a cap on the request line + headers (431 past it); httptools has no
        # such knob, so the parser is pinned. The body is capped by RequestGuardMiddleware.
        # The protocol adds the head timeout uvicorn lacks (slowloris).
        http=header_timeout_protocol(settings.header_timeout),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        # Connections beyond this get 503 from uvicorn itself, before any app code runs.
        limit_concurrency=max_connections,
        # After the drain, what is left gets only a short grace before it is cancelled.
        timeout_graceful_shutdown=2,
        timeout_keep_alive=settings.keep_alive_timeout,
    )
