"""Prometheus metrics named once, used by every service (`from livestage.observability import
METRICS`).

They live in our own `REGISTRY` rather than prometheus_client's global one, so importing the
module twice (tests, reloads) never fails on duplicate names and `/metrics` shows only ours plus
the process collectors we add explicitly. Per-session series (fps, lookahead) must be dropped
with `forget_session` when a session ends, or every session ever served stays in the scrape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    start_http_server,
)

__all__ = ["METRICS", "REGISTRY", "Metrics", "render_metrics", "start_metrics_server"]

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# Chunk latencies span ~5 ms (tiny preset stages) to a few seconds (14B on a slow node); the
# 1-second chunk budget sits in the middle so "real time or not" reads straight off the buckets.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class Metrics:
    stage_latency: Histogram
    """Per-chunk compute latency of one stage (label `stage`)."""
    chunk_e2e_latency: Histogram
    """Chunk request submitted -> frames delivered."""
    time_to_first_chunk: Histogram
    """StartSession -> first chunk delivered."""
    fps_delivered: Gauge
    lookahead_chunks: Gauge
    """Chunks generated ahead of playback (per session)."""
    sessions_per_worker: Gauge
    reply_latency: Histogram
    """End of the user's speech -> first chunk with the character's answer delivered."""
    errors: Counter
    chunks: Counter

    def forget_session(self, session_id: str) -> None:
        """Drops the per-session series of an ended session."""
        for gauge in (self.fps_delivered, self.lookahead_chunks):
            try:
                gauge.remove(session_id)
            except KeyError:
                pass


METRICS = Metrics(
    stage_latency=Histogram("livestage_stage_chunk_seconds", "Per-chunk latency of one stage",
                            ["stage"], buckets=_BUCKETS, registry=REGISTRY),
    chunk_e2e_latency=Histogram("livestage_chunk_e2e_seconds",
                                "Submit-to-delivery latency of a chunk", buckets=_BUCKETS,
                                registry=REGISTRY),
    time_to_first_chunk=Histogram("livestage_time_to_first_chunk_seconds",
                                  "Session start to first chunk delivered", buckets=_BUCKETS,
                                  registry=REGISTRY),
    fps_delivered=Gauge("livestage_fps_delivered", "Frames per second delivered", ["session_id"],
                        registry=REGISTRY),
    lookahead_chunks=Gauge("livestage_lookahead_chunks", "Chunks generated ahead of playback",
                           ["session_id"], registry=REGISTRY),
    sessions_per_worker=Gauge("livestage_sessions_per_worker", "Sessions held by this worker",
                              ["stage", "worker_id"], registry=REGISTRY),
    reply_latency=Histogram("livestage_reply_latency_seconds",
                            "End of user speech to first answer frame", buckets=_BUCKETS,
                            registry=REGISTRY),
    errors=Counter("livestage_errors_total", "Errors by kind", ["kind"], registry=REGISTRY),
    chunks=Counter("livestage_chunks_total", "Chunks processed", ["stage"], registry=REGISTRY),
)


def render_metrics() -> bytes:
    """The current exposition text (what `/metrics` serves); handy in tests and admin calls."""
    return generate_latest(REGISTRY)


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> Any | None:
    """Serves `/metrics` on `port` in a daemon thread; port 0 disables it (returns None).

    Binds all interfaces by default because Prometheus scrapes pods from outside; pass
    `addr="127.0.0.1"` on shared hosts.
    """
    if not port:
        return None
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    return server
