"""One configuration system: environment variables (prefix LIVESTAGE_) read into typed settings.

Every service subclasses `Settings` for its own fields; `load_settings` turns a bad variable into
one clear error naming it.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

T = TypeVar("T", bound="Settings")


class SettingsError(ValueError):
    """An environment variable is missing or malformed (the message names it)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIVESTAGE_", extra="ignore")

    service: str = "livestage"
    worker_id: str = ""
    nats_url: str = "nats://127.0.0.1:4222"
    redis_url: str = "redis://127.0.0.1:6379/0"
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 0
    """0 picks a free port (written to the log and to Redis)."""
    metrics_port: int = 0
    """0 disables the Prometheus endpoint."""
    log_level: str = "INFO"
    preset: str = "tiny"
    weights_dir: str = ""
    """Directory of safetensors weights; empty means seeded weights (dev only)."""
    allow_seeded_weights: bool = True
    seed: int = 0
    lookahead_chunks: int = 2
    capacity: int = 4
    """Sessions one stateful worker holds at once."""
    session_ttl_s: int = 3600
    heartbeat_interval_s: float = 0.5
    heartbeat_ttl_s: float = 2.0
    stage_timeout_s: float = 10.0
    """A chunk not delivered within this time triggers a liveness check of its workers."""
    max_audio_message_bytes: int = 1 << 20
    sample_rate: int = 16000
    backend: str = "local"
    """Where stage engines run: `local` (in the service process) or `triton` (a Triton server)."""
    triton_url: str = ""
    """host:port of Triton's gRPC endpoint when backend=triton."""
    session_idle_timeout_s: float = 600.0
    """A stage frees a session's caches after this long without a request (abandoned sessions)."""
    compile: bool = False
    """torch.compile the DiT blocks and the VAE decoder (GPU nodes; the first chunks pay for it)."""
    torch_threads: int = 0
    drain_timeout_s: float = 30.0


def load_settings(cls: type[T] = Settings, **overrides: object) -> T:  # type: ignore[assignment]
    try:
        return cls(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err.get("loc", ()))
        prefix = cls.model_config.get("env_prefix", "")
        raise SettingsError(f"bad setting {prefix}{field.upper()}: {err.get('msg')}") from None
