"""One configuration system: environment variables (prefix LIVESTAGE_) read into typed settings.

Every service subclasses `Settings` for its own fields (they get the same prefix), and starts with
`settings = load_settings(MySettings)`. A malformed variable stops the process at start-up with one
`SettingsError` that names the variable and the value it had, instead of a pydantic traceback or,
worse, a default silently used in its place.
"""

from __future__ import annotations

import os
from typing import Any, Literal, TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ENV_PREFIX", "Settings", "SettingsError", "env_name", "load_settings"]

ENV_PREFIX = "LIVESTAGE_"
S = TypeVar("S", bound="Settings")


class SettingsError(ValueError):
    """An environment variable is malformed or inconsistent (the message names it).

    `variables` lists every offending variable name, so callers (and tests) need not parse text.
    """

    def __init__(self, message: str, variables: list[str]):
        super().__init__(message)
        self.variables = variables


class Settings(BaseSettings):
    """Settings every LiveStage process shares; subclass to add a service's own fields."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    # identity
    service: str = "livestage"
    worker_id: str = ""
    """Empty: the process makes one up (`<service>-<random>`)."""

    # infrastructure
    nats_url: str = "nats://127.0.0.1:4222"
    redis_url: str = "redis://127.0.0.1:6379/0"
    max_payload: int = Field(8 * 1024 * 1024, ge=4096)
    """Largest NATS message body the transport sends in one piece; bigger ones are split. The
    server's own `max_payload` (8 MB in our nats.conf, 1 MB by default) caps it further."""

    nats_user: str = ""
    """NATS user of this service (its subject permissions: `livestage.security.nats_permissions`)."""
    nats_password: str = ""
    nats_tls_ca: str = ""
    """CA bundle that signed the NATS server's certificate: set it to require TLS to NATS."""
    redis_username: str = ""
    """Redis ACL user (the URL may carry it too); the password comes from `redis_password`."""
    redis_password: str = ""
    redis_tls_ca: str = ""
    """CA bundle of the Redis server's certificate: set it to require TLS (`rediss://`)."""

    # endpoints
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(0, ge=0, le=65535)
    """0 picks a free port (written to the log and to Redis)."""
    grpc_max_message_bytes: int = Field(16 * 1024 * 1024, ge=64 * 1024, le=256 * 1024 * 1024)
    """Largest gRPC message a server receives or sends (larger ones: RESOURCE_EXHAUSTED)."""
    grpc_reflection: bool = False
    """Serve gRPC reflection (lets anyone who reaches the port list every method): off by default."""
    grpc_tls_cert: str = ""
    """PEM certificate chain of the gRPC server; with `grpc_tls_key` the port speaks TLS."""
    grpc_tls_key: str = ""
    grpc_tls_client_ca: str = ""
    """PEM CA of client certificates: set it to require mutual TLS."""
    metrics_port: int = Field(0, ge=0, le=65535)
    """0 disables the Prometheus endpoint."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    # model
    preset: str = "tiny"
    weights_dir: str = ""
    """Directory of safetensors weights (the weights path); empty means the preset's shipped
    trained weights (`demo`), or seeded weights for presets that ship none (dev only)."""
    allow_seeded_weights: bool = True
    seed: int = 0
    backend: Literal["local", "triton"] = "local"
    """Where stage engines run: `local` (in the service process) or `triton` (a Triton server)."""
    triton_url: str = ""
    """host:port of Triton's gRPC endpoint when backend=triton."""
    compile: bool = False
    """torch.compile the DiT blocks and the VAE decoder (GPU nodes; the first chunks pay for it)."""
    torch_threads: int = Field(0, ge=0)

    # sessions and workers
    lookahead_chunks: int = Field(2, ge=1)
    capacity: int = Field(4, ge=1)
    """Sessions one stateful worker holds at once."""
    session_ttl_s: int = Field(3600, gt=0)
    """Redis records of a session expire this long after their last update."""
    heartbeat_interval_s: float = Field(0.5, gt=0)
    heartbeat_ttl_s: float = Field(2.0, gt=0)
    """Heartbeat timeout: a worker silent for this long is considered dead."""
    stage_timeout_s: float = Field(10.0, gt=0)
    """A chunk not delivered within this time triggers a liveness check of its workers."""
    start_timeout_s: float = Field(120.0, gt=0)
    """A created session not started within this long ends by itself and frees its workers."""
    session_idle_timeout_s: float = Field(600.0, gt=0)
    """A stage frees a session's caches after this long without a request (abandoned sessions)."""
    drain_timeout_s: float = Field(30.0, ge=0)
    max_audio_message_bytes: int = Field(1 << 20, gt=0)
    sample_rate: int = Field(16000, gt=0)

    # LiveKit (publisher, viewer tokens, playground). An empty URL means no LiveKit: the
    # publisher records each session to an MP4 file and the playground streams from its own endpoint.
    livekit_url: str = ""
    livekit_api_key: str = ""
    livekit_api_secret: str = ""
    livekit_public_url: str = ""
    """The URL viewers' browsers connect to, when it differs from the one services use inside the
    cluster or compose network (e.g. ws://localhost:7880 vs ws://livekit:7880)."""

    @property
    def viewer_livekit_url(self) -> str:
        return self.livekit_public_url or self.livekit_url

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, v: Any) -> Any:
        return v.strip().upper() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _heartbeat_fits_ttl(self) -> "Settings":
        # A TTL shorter than the beat interval makes every healthy worker flap dead/alive.
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"{env_name('heartbeat_ttl_s')} ({self.heartbeat_ttl_s}) must be larger than "
                f"{env_name('heartbeat_interval_s')} ({self.heartbeat_interval_s})")
        if self.backend == "triton" and not self.triton_url:
            raise ValueError(f"{env_name('triton_url')} is required when "
                             f"{env_name('backend')}=triton")
        if bool(self.grpc_tls_cert) != bool(self.grpc_tls_key):
            raise ValueError(f"{env_name('grpc_tls_cert')} and {env_name('grpc_tls_key')} go together")
        if self.grpc_tls_client_ca and not self.grpc_tls_cert:
            raise ValueError(f"{env_name('grpc_tls_client_ca')} needs {env_name('grpc_tls_cert')} "
                             f"and {env_name('grpc_tls_key')}")
        if self.livekit_url and not (self.livekit_api_key and self.livekit_api_secret):
            raise ValueError(f"{env_name('livekit_api_key')} and {env_name('livekit_api_secret')} "
                             f"are required when {env_name('livekit_url')} is set")
        return self


def env_name(field: str, cls: type[Settings] = Settings) -> str:
    """The environment variable that sets `field` (e.g. `LIVESTAGE_GRPC_PORT`)."""
    return f"{cls.model_config.get('env_prefix', '')}{field}".upper()


def load_settings(cls: type[S] = Settings, **overrides: Any) -> S:  # type: ignore[assignment]
    """Reads `cls` from the environment (keyword overrides win) or raises `SettingsError`.

    The message names every bad variable with its current value, e.g.
    `bad setting LIVESTAGE_CAPACITY='many': Input should be a valid integer`.
    """
    try:
        return cls(**overrides)
    except ValidationError as exc:
        lines: list[str] = []
        names: list[str] = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p != "__root__"]
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            if not loc:  # a cross-field check: its message already names the variables
                lines.append(msg)
                names.extend(w.rstrip(",.:") for w in msg.split() if w.startswith(ENV_PREFIX))
                continue
            var = env_name(loc[0], cls)
            if loc[0] in overrides:
                shown = f" (override {overrides[loc[0]]!r})"
            elif var in os.environ:
                shown = f"={os.environ[var]!r}"
            else:
                shown = ""
            lines.append(f"{var}{shown}: {msg}")
            names.append(var)
        raise SettingsError("bad setting " + "; ".join(lines), names) from None
