"""One logging setup (structlog JSON), OpenTelemetry tracing with W3C context, Prometheus metrics."""

from livestage.observability.logging import bind_session, configure_logging, get_logger
from livestage.observability.metrics import METRICS, REGISTRY, render_metrics, start_metrics_server
from livestage.observability.tracing import (
    configure_tracing,
    current_trace_id,
    extract_context,
    grpc_client_interceptors,
    grpc_server_interceptors,
    inject_headers,
    instrument_grpc,
    tracer,
    use_memory_exporter,
)

__all__ = ["METRICS", "REGISTRY", "bind_session", "configure_logging", "configure_tracing",
           "current_trace_id", "extract_context", "get_logger", "grpc_client_interceptors",
           "grpc_server_interceptors", "inject_headers", "instrument_grpc", "render_metrics",
           "start_metrics_server", "tracer", "use_memory_exporter"]
