"""structlog JSON logs with `service`, `session_id`, `chunk` and `trace_id` bound automatically."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

import structlog
from opentelemetry import trace


def _add_trace_id(_, __, event: dict) -> dict:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event.setdefault("span_id", format(ctx.span_id, "016x"))
    return event


def configure_logging(service: str, level: str = "INFO") -> None:
    """JSON lines on stdout for structlog and the standard logging module alike."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace_id,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.JSONRenderer()],
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)


@contextlib.contextmanager
def bind_session(session_id: str, chunk: int | None = None) -> Iterator[None]:
    """Binds session_id (and chunk) to every log line inside the block."""
    values: dict[str, object] = {"session_id": session_id}
    if chunk is not None:
        values["chunk"] = chunk
    with structlog.contextvars.bound_contextvars(**values):
        yield
