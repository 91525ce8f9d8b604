"""Session state in Redis: session records, placement, worker heartbeats, latent checkpoints."""

from livestage.state.store import (
    CheckpointStore,
    SessionNotFound,
    SessionStore,
    WorkerInfo,
    WorkerRegistry,
    connect_redis,
)

__all__ = ["CheckpointStore", "SessionNotFound", "SessionStore", "WorkerInfo", "WorkerRegistry",
           "connect_redis"]
