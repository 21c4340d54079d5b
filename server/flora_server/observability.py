"""Request ids, the per-request access log, and log formatting.

Every HTTP request gets an id: the client's `X-Request-Id` when it is usable (1-128 of
`A-Z a-z 0-9 . _ : -`, starting with a letter or digit), else a fresh uuid4 hex. The id is
returned in `X-Request-Id` on every response (streams and errors included), is part of the
engine's request id (`gen-<id>`, `chatcmpl-<id>`: engine log lines and errors name it), and is
attached to every log line written while the request runs.

One structured access-log line (logger `flora_server.access`) is written per request when it
ends: id, method, route template, status, adapter, tenant (a short hash, never the name),
prompt and generated tokens, finish reason, whether the adapter was cold (not on a device
slot when the request arrived), queue time, time to first token and total time. Probes and
scrapes (`/health`, `/ready`, `/metrics`) log at DEBUG only.

`configure_logging(level, "json")` makes every log line one JSON object (the access line's
fields are top-level keys).
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.routing import Match

from flora_server import auth
from flora_server.engine.protocol import FinishEvent, GenerationRequest
from flora_server.errors import error_body

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_QUIET_ROUTES = frozenset({"/health", "/ready", "/metrics"})
access_logger = logging.getLogger("flora_server.access")
logger = logging.getLogger(__name__)


def accept_request_id(presented: str | None) -> str:
    """The client's id when it is well formed, else a new uuid4 hex."""
    if presented is not None and _REQUEST_ID_RE.fullmatch(presented):
        return presented
    return uuid.uuid4().hex


def tenant_hash(tenant: str | None) -> str | None:
    """A stable short digest of a tenant name, so logs can group by tenant without naming it."""
    if tenant is None:
        return None
    return hashlib.sha256(tenant.encode()).hexdigest()[:12]


def route_template(scope: Any) -> str:
    """The route's path template, never the raw path (ids in paths must not become labels).
    FastAPI's own routes record themselves in the scope; Starlette routes such as
    /openapi.json, /docs and /redoc do not, so they are matched against the app's routes."""
    route = scope.get("route")
    if route is None:
        routes = getattr(getattr(scope.get("app"), "router", None), "routes", ())
        route = next((r for r in routes if r.matches(scope)[0] is Match.FULL), None)
    return getattr(route, "path", "unmatched")


# The HTTP methods a metric label names; anything else a client sends (any token is a
# valid method) is "other", or every invented method would add a series forever.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(scope: Any) -> str:
    """The request's method as a metric label: one of `_METHODS`, else "other"."""
    method = scope.get("method", "")
    return method if method in _METHODS else "other"


@dataclass
class RequestRecord:
    """What the access log and the trace say about one request. Times are time.monotonic();
    the generation routes fill the generation fields (see `GenerationObserver`)."""

    request_id: str
    method: str
    path: str
    start: float = field(default_factory=time.monotonic)
    start_ns: int = field(default_factory=time.time_ns)  # wall clock at `start`, for spans
    route: str = "unmatched"
    status: int = 500
    adapter: str | None = None
    tenant: str | None = None  # already hashed
    cold: bool | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    finish_reason: str | None = None
    submitted: float | None = None
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    span: Any = None  # the OpenTelemetry request span when tracing is on

    def wall_ns(self, monotonic: float) -> int:
        """Epoch nanoseconds of a time.monotonic() reading taken during this request."""
        return self.start_ns + int((monotonic - self.start) * 1e9)

    def access_fields(self, end: float) -> dict[str, Any]:
        def since(t0: float | None, t1: float | None) -> float | None:
            return None if t0 is None or t1 is None else round(t1 - t0, 6)

        return {
            "request_id": self.request_id,
            "method": self.method,
            "route": self.route,
            "status": self.status,
            "adapter": self.adapter,
            "tenant": self.tenant,
            "cold": self.cold,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "finish_reason": self.finish_reason,
            "queue_s": since(self.submitted, self.admitted),
            "ttft_s": since(self.start, self.first_token),
            "total_s": round(end - self.start, 6),
        }


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "flora_request", default=None
)


def current_record() -> RequestRecord | None:
    """The record of the request being handled in this context (None outside one)."""
    return _current.get()


def current_request_id() -> str | None:
    record = _current.get()
    return record.request_id if record is not None else None


class RequestContextMiddleware:
    """Pure ASGI (streams and disconnects pass through): assigns the request id, returns it,
    writes the access line, and opens the request span when tracing is on. Install it
    outermost so that every answer, the guards' included, carries the id. Tracing is
    `app.state.tracing` (a `flora_server.tracing.Tracing`, or None: off)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        presented = headers.get(REQUEST_ID_HEADER.lower().encode())
        record = RequestRecord(
            request_id=accept_request_id(presented.decode("latin-1") if presented else None),
            method=scope["method"],
            path=scope.get("path", ""),
        )
        token = _current.set(record)
        tracing = getattr(getattr(scope.get("app"), "state", None), "tracing", None)
        if tracing is not None:
            record.span = tracing.start_request(record, scope.get("headers") or [])
        started = False

        async def send_with_id(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                record.status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = record.request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Past every exception handler (Starlette answers these outside the user
            # middleware, without the id): answer here, in the same JSON error shape.
            logger.exception("unhandled error")
            if started:
                raise
            await _send_500(send_with_id)
        finally:
            record.route = route_template(scope)
            end = time.monotonic()
            if tracing is not None:
                tracing.end_request(record, end)
            level = logging.DEBUG if record.route in _QUIET_ROUTES else logging.INFO
            if access_logger.isEnabledFor(level):
                fields = record.access_fields(end)
                access_logger.log(level, _access_message(fields), extra={"access": fields})
            _current.reset(token)


async def _send_500(send: Any) -> None:
    body = json.dumps(error_body("server_error", "internal server error")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 500,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _access_message(fields: dict[str, Any]) -> str:
    """The text form: `METHOD ROUTE STATUS key=value ...` (None values left out)."""
    head = f"{fields['method']} {fields['route']} {fields['status']}"
    rest = " ".join(
        f"{k}={v}"
        for k, v in fields.items()
        if v is not None and k not in ("method", "route", "status", "request_id")
    )
    return f"{head} {rest}"


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (or "-") to every record, for the formats below."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, the access fields
    of an access line, and the exception text when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        out.update(getattr(record, "access", None) or {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def configure_logging(level: str, log_format: str) -> None:
    """Root logging for the server process: `text` (human) or `json` (one object a line),
    with the request id on every line. uvicorn's loggers propagate here."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if log_format == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


class GenerationObserver:
    """Fills the current request's record from one generation: adapter, tenant, cold or warm,
    submission, admission (the engine's `admitted_at`), first token and finish. Does nothing
    outside a request context (preloads, benchmarks calling the engine directly)."""

    def __init__(self, request: GenerationRequest, loaded_adapters: tuple[str, ...]) -> None:
        self.request = request
        self.record = current_record()
        if self.record is None:
            return
        self.record.adapter = request.adapter_id
        self.record.tenant = tenant_hash(auth.current_principal().tenant)
        if request.adapter_id is not None:
            self.record.cold = request.adapter_id not in loaded_adapters
        self.record.submitted = time.monotonic()

    def token(self) -> None:
        if self.record is not None and self.record.first_token is None:
            self.record.first_token = time.monotonic()

    def finish(self, event: FinishEvent) -> None:
        if self.record is None:
            return
        self.record.finished = time.monotonic()
        self.record.admitted = self.request.admitted_at
        self.record.prompt_tokens = event.prompt_tokens
        self.record.generated_tokens = event.generated_tokens
        self.record.finish_reason = event.reason
