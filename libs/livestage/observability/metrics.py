"""Prometheus metrics named once, used by every service."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0)


@dataclass(frozen=True)
class _Metrics:
    stage_latency: Histogram
    chunk_e2e_latency: Histogram
    time_to_first_chunk: Histogram
    fps_delivered: Gauge
    lookahead_chunks: Gauge
    sessions_per_worker: Gauge
    errors: Counter
    chunks: Counter


METRICS = _Metrics(
    stage_latency=Histogram("livestage_stage_chunk_seconds", "Per-chunk latency of one stage",
                            ["stage"], buckets=_BUCKETS, registry=REGISTRY),
    chunk_e2e_latency=Histogram("livestage_chunk_e2e_seconds", "Submit-to-delivery latency of a chunk",
                                buckets=_BUCKETS, registry=REGISTRY),
    time_to_first_chunk=Histogram("livestage_time_to_first_chunk_seconds",
                                  "Session start to first chunk delivered", buckets=_BUCKETS,
                                  registry=REGISTRY),
    fps_delivered=Gauge("livestage_fps_delivered", "Frames per second delivered", ["session_id"],
                        registry=REGISTRY),
    lookahead_chunks=Gauge("livestage_lookahead_chunks", "Chunks generated ahead of playback",
                           ["session_id"], registry=REGISTRY),
    sessions_per_worker=Gauge("livestage_sessions_per_worker", "Sessions held by this worker",
                              ["stage", "worker_id"], registry=REGISTRY),
    errors=Counter("livestage_errors_total", "Errors by kind", ["kind"], registry=REGISTRY),
    chunks=Counter("livestage_chunks_total", "Chunks processed", ["stage"], registry=REGISTRY),
)


def start_metrics_server(port: int) -> None:
    if port:
        start_http_server(port, addr="0.0.0.0", registry=REGISTRY)
