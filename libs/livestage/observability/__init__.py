"""One logging setup (structlog JSON), OpenTelemetry tracing with W3C context, Prometheus metrics."""

from livestage.observability.logging import bind_session, configure_logging, get_logger
from livestage.observability.metrics import METRICS, start_metrics_server
from livestage.observability.tracing import configure_tracing, extract_context, inject_headers, tracer

__all__ = ["METRICS", "bind_session", "configure_logging", "configure_tracing", "extract_context",
           "get_logger", "inject_headers", "start_metrics_server", "tracer"]
