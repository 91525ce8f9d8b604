"""OpenTelemetry tracing; W3C trace context travels in NATS headers and gRPC metadata."""

from __future__ import annotations

import os

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter

_provider: TracerProvider | None = None


def configure_tracing(service: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """Installs the process's tracer provider once; exports OTLP when OTEL_EXPORTER_OTLP_ENDPOINT
    is set. Later calls may add an exporter (tests use an in-memory one)."""
    global _provider
    if _provider is None:
        _provider = TracerProvider(resource=Resource.create({"service.name": service}))
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
                from opentelemetry.sdk.trace.export import BatchSpanProcessor

                _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            except ImportError:  # exporter package not installed: spans stay local
                pass
        trace.set_tracer_provider(_provider)
    if exporter is not None:
        _provider.add_span_processor(SimpleSpanProcessor(exporter))
    return _provider


def tracer(name: str = "livestage") -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Adds `traceparent` (and `tracestate`) of the current span to `headers`."""
    headers = dict(headers or {})
    propagate.inject(headers)
    return headers


def extract_context(headers: dict[str, str] | None) -> otel_context.Context:
    return propagate.extract(headers or {})
