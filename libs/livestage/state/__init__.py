"""Session state in Redis: session records, placement, worker heartbeats, latent checkpoints."""

from livestage.state.store import (
    COUNTERS,
    CheckpointStore,
    NoWorkerAvailable,
    SessionNotFound,
    SessionRecord,
    SessionStore,
    WorkerInfo,
    WorkerRegistry,
    connect_redis,
    redis_from_settings,
)

__all__ = ["COUNTERS", "CheckpointStore", "NoWorkerAvailable", "SessionNotFound", "SessionRecord",
           "SessionStore", "WorkerInfo", "WorkerRegistry", "connect_redis",
           "redis_from_settings"]
