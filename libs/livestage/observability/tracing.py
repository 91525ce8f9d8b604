"""OpenTelemetry tracing: one tracer provider per process, W3C trace context carried in NATS
headers and gRPC metadata, so one chunk is one trace from the session API through every stage.

Exporters, chosen once at `configure_tracing`:
- `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) set and the OTLP exporter package
  installed: batch export over OTLP (gRPC, or HTTP when `OTEL_EXPORTER_OTLP_PROTOCOL` starts
  with `http`). Set but not installed: a warning, no export (tracing must never stop a service).
- `OTEL_TRACES_EXPORTER=console`: spans printed to stderr (local debugging).
- otherwise no exporter: spans still exist, so trace ids reach logs and NATS/gRPC headers.
Tests call `use_memory_exporter()` to read finished spans.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, MutableMapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

__all__ = ["configure_tracing", "current_trace_id", "extract_context", "grpc_client_interceptors",
           "grpc_server_interceptors", "inject_headers", "instrument_grpc", "tracer",
           "use_memory_exporter"]

_log = logging.getLogger(__name__)
_provider: TracerProvider | None = None
_memory: InMemorySpanExporter | None = None
_grpc_instrumented = False


def _otlp_exporter() -> SpanExporter | None:
    endpoint = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    if not endpoint:
        return None
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")
    try:
        if protocol.startswith("http"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        _log.warning("OTEL_EXPORTER_OTLP_ENDPOINT=%s is set but the OTLP exporter package "
                     "(opentelemetry-exporter-otlp) is not installed: spans are not exported",
                     endpoint)
        return None
    return OTLPSpanExporter()  # reads endpoint, headers, TLS from the standard OTEL_* variables


def configure_tracing(service: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """Installs the process's tracer provider (once) and returns it.

    Later calls do not replace the provider (OpenTelemetry forbids that) but may add `exporter`,
    which tests use to capture spans synchronously.
    """
    global _provider
    if _provider is None:
        current = trace.get_tracer_provider()
        if isinstance(current, TracerProvider):  # someone installed an SDK provider first: share it
            _provider = current
        else:
            _provider = TracerProvider(resource=Resource.create({"service.name": service}))
            otlp = _otlp_exporter()
            if otlp is not None:
                _provider.add_span_processor(BatchSpanProcessor(otlp))
            if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "console":
                _provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
            trace.set_tracer_provider(_provider)
    if exporter is not None:
        _provider.add_span_processor(SimpleSpanProcessor(exporter))
    return _provider


def use_memory_exporter() -> InMemorySpanExporter:
    """An in-memory exporter on the process's provider (created once; cleared on each call)."""
    global _memory
    if _memory is None:
        _memory = InMemorySpanExporter()
        configure_tracing("test", exporter=_memory)
    _memory.clear()
    return _memory


def tracer(name: str = "livestage") -> trace.Tracer:
    return trace.get_tracer(name)


def current_trace_id() -> str | None:
    """The current span's trace id as 32 hex digits, or None outside any (valid) span."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def inject_headers(headers: Mapping[str, str] | None = None,
                   context: otel_context.Context | None = None) -> dict[str, str]:
    """A copy of `headers` plus `traceparent` (and `tracestate`) of the current span (or `context`).

    NATS headers are plain string maps, so the W3C propagator writes into them directly.
    """
    out: dict[str, str] = dict(headers or {})
    propagate.inject(out, context=context)
    return out


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The remote span context from received headers; use as `start_as_current_span(context=...)`.

    Header names are matched case-insensitively: some NATS clients and proxies change case.
    """
    carrier: MutableMapping[str, str] = {k.lower(): v for k, v in (headers or {}).items()}
    return propagate.extract(carrier)


def _not_health() -> Any:
    from opentelemetry.instrumentation.grpc import filters

    # Kubernetes probes call Health every few seconds: spans for them are noise.
    return filters.negate(filters.health_check())


def grpc_server_interceptors() -> list[Any]:
    """Interceptors for `grpc.aio.server(interceptors=...)`: a server span per RPC, child of the
    caller's span when its metadata carries trace context."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=_provider, filter_=_not_health())]


def grpc_client_interceptors() -> list[Any]:
    """Interceptors for `grpc.aio.insecure_channel(..., interceptors=...)`: a client span per call,
    with its trace context sent in the request metadata."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(tracer_provider=_provider, filter_=_not_health()))


def instrument_grpc() -> None:
    """Instruments every grpc.aio server and channel the process creates afterwards (idempotent),
    for code that builds servers/channels without passing interceptors."""
    global _grpc_instrumented
    if _grpc_instrumented:
        return
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcAioInstrumentorServer

    GrpcAioInstrumentorServer().instrument(tracer_provider=_provider)
    GrpcAioInstrumentorClient().instrument(tracer_provider=_provider)
    _grpc_instrumented = True
