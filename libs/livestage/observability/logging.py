"""structlog JSON logs: one line per event on stdout, with `timestamp`, `level`, `service`, and —
whenever they are known — `session_id`, `chunk` and `trace_id`/`span_id`.

`session_id`/`chunk` live in contextvars (`bind_session`), so they follow a request through
`await`s and into tasks created inside the block without being passed around; `trace_id` is read
from the current OpenTelemetry span at each log call, so logs and traces join on it. Standard
`logging` records (grpc, nats, asyncio, third-party libraries) go through the same renderer, so
the whole stream is machine-readable.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Iterator, MutableMapping, TextIO

import structlog
from opentelemetry import trace

__all__ = ["bind_session", "configure_logging", "get_logger"]


def _add_trace_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event.setdefault("span_id", format(ctx.span_id, "016x"))
    return event


def configure_logging(service: str, level: str = "INFO", stream: TextIO | None = None) -> None:
    """JSON lines for structlog and the standard logging module alike (call once at start-up).

    `stream` defaults to the *current* `sys.stdout` at each write, so pytest's capture and
    container log collection both see the lines.
    """
    lvl = logging.getLevelName(level.upper()) if isinstance(level, str) else int(level)
    if not isinstance(lvl, int):
        raise ValueError(f"unknown log level {level!r}")
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        _add_trace_ids,
    ]
    factory = structlog.PrintLoggerFactory(stream) if stream is not None else _StdoutLoggerFactory()
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(),
                    structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)
    handler = logging.StreamHandler(stream) if stream is not None else _StdoutHandler()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)


class _StdoutLoggerFactory:
    """Like PrintLoggerFactory(sys.stdout) but resolves sys.stdout on every call (capture-safe)."""

    def __call__(self, *args: Any) -> structlog.PrintLogger:
        return structlog.PrintLogger(sys.stdout)


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler bound to whatever sys.stdout is when a record is emitted."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stdout

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def get_logger(name: str | None = None, **initial: Any) -> Any:
    """A structlog logger; `initial` key/values are bound to every line it writes."""
    log = structlog.get_logger(name)
    return log.bind(**initial) if initial else log


@contextlib.contextmanager
def bind_session(session_id: str, chunk: int | None = None) -> Iterator[None]:
    """Binds `session_id` (and `chunk`) to every log line written inside the block, in this task
    and in tasks it creates; the previous values come back on exit (blocks may nest)."""
    values: dict[str, object] = {"session_id": session_id}
    if chunk is not None:
        values["chunk"] = chunk
    with structlog.contextvars.bound_contextvars(**values):
        yield
