"""Optional OpenTelemetry tracing (`pip install flora-serve[otel]`), off by default.

With `--otel-endpoint URL` (env FLORA_OTEL_ENDPOINT; an OTLP/HTTP traces endpoint such as
`http://collector:4318/v1/traces`) each HTTP request becomes a server span
`METHOD ROUTE` (parent: an incoming W3C `traceparent`), and a generation adds child spans
laid out from the times the request already records, so the hot path pays nothing extra:

- `queue`: submitted to the engine until it got a batch row;
- `adapter_load`: the same interval, when the adapter was not on a device slot on arrival
  (the wait was for its load from the host cache or the store);
- `prefill`: batch row until the first token;
- `decode`: first token until the last.

Without an endpoint nothing is imported and no span is made.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from flora_server.observability import RequestRecord

if TYPE_CHECKING:
    from opentelemetry.trace import Span

logger = logging.getLogger(__name__)


class Tracing:
    """Spans for requests from one `opentelemetry.trace.Tracer`."""

    def __init__(self, tracer: Any) -> None:
        from opentelemetry import propagate, trace

        self._tracer = tracer
        self._trace = trace
        self._propagate = propagate

    def start_request(
        self, record: RequestRecord, raw_headers: Iterable[tuple[bytes, bytes]]
    ) -> Span:
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw_headers}
        parent = self._propagate.extract(carrier)
        return self._tracer.start_span(
            f"{record.method} {record.path}",
            context=parent,
            kind=self._trace.SpanKind.SERVER,
            start_time=record.start_ns,
            attributes={
                "http.request.method": record.method,
                "flora.request_id": record.request_id,
            },
        )

    def end_request(self, record: RequestRecord, end: float) -> None:
        span = record.span
        if span is None:
            return
        span.update_name(f"{record.method} {record.route}")
        span.set_attribute("http.route", record.route)
        span.set_attribute("http.response.status_code", record.status)
        if record.adapter is not None:
            span.set_attribute("flora.adapter", record.adapter)
        if record.generated_tokens is not None:
            span.set_attribute("flora.prompt_tokens", record.prompt_tokens or 0)
            span.set_attribute("flora.generated_tokens", record.generated_tokens)
        if record.status >= 500:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR))
        self._phases(record, span, end)
        span.end(end_time=record.wall_ns(end))

    def _phases(self, record: RequestRecord, parent: Any, end: float) -> None:
        context = self._trace.set_span_in_context(parent)
        last = record.finished or end
        phases = [
            ("queue", record.submitted, record.admitted),
            ("prefill", record.admitted, record.first_token),
            ("decode", record.first_token, last if record.first_token is not None else None),
        ]
        if record.cold:
            phases.insert(1, ("adapter_load", record.submitted, record.admitted))
        for name, t0, t1 in phases:
            if t0 is None or t1 is None:
                continue
            span = self._tracer.start_span(name, context=context, start_time=record.wall_ns(t0))
            span.end(end_time=record.wall_ns(t1))


def build_tracing(endpoint: str | None, service_name: str = "flora-serve") -> Tracing | None:
    """A `Tracing` exporting to `endpoint` over OTLP/HTTP, or None when there is no endpoint.
    Raises RuntimeError naming the extra when OpenTelemetry is not installed."""
    if not endpoint:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise RuntimeError(
            "--otel-endpoint needs OpenTelemetry: pip install 'flora-serve[otel]'"
        ) from exc
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    logger.info("tracing to %s", endpoint)
    return Tracing(provider.get_tracer("flora_server"))
