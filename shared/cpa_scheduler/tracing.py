"""OpenTelemetry tracing, configured only by the standard ``OTEL_*`` variables.

Tracing is on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is
set (and ``OTEL_SDK_DISABLED`` is not ``true``); spans go out over OTLP/HTTP. Otherwise nothing
of OpenTelemetry is imported and every helper here is a cheap no-op, so tracing off costs a
boolean test per call site.

A job keeps the W3C ``traceparent`` of the span that created it (``jobs.traceparent``). The
dispatcher, possibly another process or Lambda minutes later, parents its spans of that job on
it; ``assign`` messages carry it to desktop agents, whose answers continue the trace with a
``traceparent`` header (or, lacking one, the message's ``trace_id``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # re-exported for annotations elsewhere; never imported at run time
    from opentelemetry.context import Context as Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span as Span
    from opentelemetry.trace import Tracer

TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
INSTRUMENTATION = "cpa_scheduler"

_provider: TracerProvider | None = None
_tracer: Tracer | None = None  # one per process: get_tracer builds a new one on every call


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether the OTEL_* variables ask for tracing."""
    # Read here, not through settings: the OpenTelemetry SDK owns the OTEL_* variables and
    # reads them itself (endpoint, headers, sampler, resource), so they have one reader each.
    source = os.environ if env is None else env
    if source.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if source.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(
        source.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or source.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )


def active() -> bool:
    """Whether :func:`setup` turned tracing on in this process."""
    return _provider is not None


def setup(service_name: str) -> bool:
    """Turn tracing on if the environment asks for it; idempotent. Returns :func:`active`.

    Instruments httpx (outbound ``http.request`` and LLM calls) and psycopg (every query)."""
    global _provider, _tracer
    if _provider is not None or not enabled():
        return active()
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    HTTPXClientInstrumentor().instrument()
    PsycopgInstrumentor().instrument(enable_commenter=False, skip_dep_check=True)
    _provider = provider
    _tracer = provider.get_tracer(INSTRUMENTATION)
    return True


def instrument_app(app: Any) -> None:
    """Server spans for a FastAPI app; a ``traceparent`` header continues the caller's trace."""
    if not active():
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, excluded_urls="healthz,readyz,metrics")


def flush(timeout_ms: int = 5000) -> None:
    """Export the spans still buffered; a Lambda handler calls this before it returns."""
    if _provider is not None:
        _provider.force_flush(timeout_ms)


def shutdown() -> None:
    global _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
        _provider = _tracer = None


def current_ids() -> tuple[str, str] | None:
    """``(trace_id, span_id)`` of the current span, as hex, or None."""
    if _provider is None:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def traceparent(span: Span | None = None) -> str | None:
    """The W3C traceparent of ``span`` (default: the current one), or None."""
    if _provider is None:
        return None
    from opentelemetry import trace

    ctx = (span or trace.get_current_span()).get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def trace_id_of(value: str | None) -> str | None:
    """The trace id inside a traceparent."""
    match = TRACEPARENT.match(value or "")
    return match.group(1) if match else None


def parent(value: str | None) -> Context | None:
    """An OpenTelemetry context whose remote parent is this traceparent (None if unusable)."""
    if _provider is None or not value or not TRACEPARENT.match(value):
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": value})


def parent_from_trace_id(trace_id: str | None, seed: str) -> Context | None:
    """A remote parent in the trace a protocol message names by ``trace_id`` alone.

    The message has no span id, so one is derived from ``seed`` (the message id): spans of the
    answer then share the sender's trace id, under a parent that the sender never exported."""
    if _provider is None or not trace_id or not _TRACE_ID.match(trace_id) or set(trace_id) == {"0"}:
        return None
    span_id = hashlib.blake2b(seed.encode(), digest_size=8).hexdigest()
    if set(span_id) == {"0"}:
        span_id = "1".rjust(16, "0")
    return parent(f"00-{trace_id}-{span_id}-01")


@contextlib.contextmanager
def span(
    name: str,
    *,
    context: Context | None = None,
    attributes: Mapping[str, Any] | None = None,
    links: list[Span] | None = None,
) -> Iterator[Span | None]:
    """A span made current for the block (None when tracing is off).

    ``context`` picks the parent (default: the current span); ``links`` point at related spans
    of other traces (a dispatch pass that handled many jobs)."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(
        name, context=context, attributes=attributes, links=_links(links)
    ) as s:
        yield s


def start(
    name: str,
    *,
    context: Context | None = None,
    attributes: Mapping[str, Any] | None = None,
    links: list[Span] | None = None,
    start_time: int | None = None,
) -> Span | None:
    """A span that the caller ends (not made current); None when tracing is off."""
    if _tracer is None:
        return None
    return _tracer.start_span(
        name, context=context, attributes=attributes, links=_links(links), start_time=start_time
    )


def _links(spans: list[Span] | None) -> list[Any] | None:
    if not spans:
        return None
    from opentelemetry import trace

    return [trace.Link(s.get_span_context()) for s in spans]


def context_of(s: Span) -> Context:
    """A context whose current span is ``s``: the parent for spans started later."""
    from opentelemetry import trace

    return trace.set_span_in_context(s)


def record_error(s: Span | None, message: str) -> None:
    if s is None:
        return
    from opentelemetry.trace import Status, StatusCode

    s.set_status(Status(StatusCode.ERROR, message))
