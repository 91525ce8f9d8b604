"""`LocalStack`: nats-server, redis-server and every LiveStage service as separate processes on
loopback. Used by `make up` (the local launcher), the integration tests and the benchmarks."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from livestage.devstack.credentials import DEVTOOLS_USER, REDIS_USER, StackCredentials
from livestage.devstack.datastores import free_port, start_nats, start_redis
from livestage.devstack.servers import ManagedProcess, start_service
from livestage.state import WorkerRegistry, connect_redis
from livestage.transport import NatsBus
from livestage.transport.subjects import inbox_prefix

STAGES = ("encoder", "generator", "refiner", "decoder")
CONVERSATION_STAGES = ("tts", "dialogue", "publisher")


@dataclass
class LocalStack:
    workdir: Path
    preset: str = "tiny"
    generators: int = 1
    env: dict[str, str] = field(default_factory=dict)
    nats: ManagedProcess | None = None
    redis: ManagedProcess | None = None
    services: dict[str, ManagedProcess] = field(default_factory=dict)
    session_port: int = 0
    backend: str = "local"
    """`triton`: also start a Triton server on a generated repository; stages call it."""
    triton: ManagedProcess | None = None
    conversation: bool = False
    """Also start the dialogue, tts and publisher services (the conversation loop)."""
    playground: bool = False
    """Also start the browser playground (`playground_port`)."""
    playground_port: int = 0
    playground_login_url: str = ""
    """The one-time login link the playground accepts (printed by `make up`)."""
    extra_tenants: list[dict] = field(default_factory=list)
    """Tenants besides `dev` (id and limits); their keys are in `credentials.tenant_keys`."""
    credentials: StackCredentials | None = None

    def base_env(self) -> dict[str, str]:
        assert self.nats and self.redis
        env = {"LIVESTAGE_NATS_URL": self.nats.url, "LIVESTAGE_REDIS_URL": self.redis.url,
               "LIVESTAGE_PRESET": self.preset, "LIVESTAGE_LOG_LEVEL": "INFO",
               "LIVESTAGE_BACKEND": self.backend,
               "LIVESTAGE_RECORDINGS_DIR": str(self.workdir / "recordings"), **self.env}
        if self.triton is not None:
            env["LIVESTAGE_TRITON_URL"] = self.triton.url
        return env

    def start_triton(self) -> None:
        from livestage.devstack.triton import python_search_path, start_triton
        from livestage.serving.triton.repository import STAGES, build_repository

        repo = build_repository(self.workdir / "triton-repo", self.preset, allow_seeded=True,
                                sys_path=python_search_path(), torch_threads=1)
        self.triton = start_triton(repo, self.workdir / "triton", models=STAGES)

    def service_env(self, service: str) -> dict[str, str]:
        """`base_env` plus the service's own NATS login (its subject permissions)."""
        assert self.credentials is not None
        return {**self.base_env(), "LIVESTAGE_NATS_USER": service,
                "LIVESTAGE_NATS_PASSWORD": self.credentials.nats_passwords[service]}

    @property
    def api_key(self) -> str:
        """The development tenant's API key (what the stack's own clients send)."""
        assert self.credentials is not None
        return self.credentials.api_key

    async def connect_bus(self, user: str = DEVTOOLS_USER) -> NatsBus:
        """A NATS client of this stack as `user` (default: the dev-only user that sees everything)."""
        assert self.nats is not None and self.credentials is not None
        return await NatsBus.connect(self.nats.url, name=f"test-{user}", user=user,
                                     password=self.credentials.nats_passwords[user],
                                     inbox_prefix=inbox_prefix(user))

    def start_stage(self, stage: str, worker_id: str) -> ManagedProcess:
        port = free_port()
        env = {**self.service_env(stage), "LIVESTAGE_WORKER_ID": worker_id, "LIVESTAGE_GRPC_PORT": str(port)}
        proc = start_service(stage, env, self.workdir / "logs", tag=worker_id)
        proc.extra["grpc_port"] = port
        self.services[worker_id] = proc
        return proc

    def start(self, timeout: float = 120.0) -> "LocalStack":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.credentials = creds = StackCredentials.generate(self.workdir, self.extra_tenants)
        self.nats = start_nats(self.workdir / "nats", authorization=creds.nats_authorization())
        self.redis = start_redis(self.workdir / "redis", users={REDIS_USER: creds.redis_password})
        try:
            if self.backend == "triton":
                self.start_triton()
            self.start_stage("encoder", "encoder-1")
            for i in range(self.generators):
                self.start_stage("generator", f"generator-{i + 1}")
            self.start_stage("refiner", "refiner-1")
            self.start_stage("decoder", "decoder-1")
            counts = {"encoder": 1, "generator": self.generators, "refiner": 1, "decoder": 1}
            if self.conversation:
                for stage in CONVERSATION_STAGES:
                    self.start_stage(stage, f"{stage}-1")
                counts.update({"dialogue": 1, "publisher": 1})
            self.wait_for_workers(counts, timeout)
            self.session_port = free_port()
            env = {**self.service_env("session"), "LIVESTAGE_GRPC_PORT": str(self.session_port),
                   "LIVESTAGE_WORKER_ID": "session-1", "LIVESTAGE_TENANTS_FILE": str(creds.tenants_file)}
            self.services["session"] = start_service("session", env, self.workdir / "logs",
                                                     wait_port=self.session_port)
            if self.playground:
                import hashlib
                import secrets

                self.playground_port = self.playground_port or free_port()
                env = {**self.service_env("playground"), "LIVESTAGE_SESSION_ADDRESS": self.session_address,
                       "LIVESTAGE_PLAYGROUND_PORT": str(self.playground_port)}
                base = f"http://127.0.0.1:{self.playground_port}"
                # a one-time login link for the dev key (none when the operator brought the tenants file)
                self.playground_login_url = f"{base}/"
                if creds.api_key_file is not None:
                    ticket = secrets.token_urlsafe(32)
                    env["LIVESTAGE_PLAYGROUND_TICKET_SHA256"] = hashlib.sha256(ticket.encode()).hexdigest()
                    env["LIVESTAGE_PLAYGROUND_TICKET_KEY_FILE"] = str(creds.api_key_file)
                    self.playground_login_url = f"{base}/login?ticket={ticket}"
                self.services["playground"] = start_service("playground", env, self.workdir / "logs",
                                                            wait_port=self.playground_port)
        except Exception:
            self.stop()
            raise
        return self

    def wait_for_workers(self, counts: dict[str, int], timeout: float = 120.0) -> None:
        async def check() -> bool:
            r = connect_redis(self.redis.url)  # type: ignore[union-attr]
            try:
                reg = WorkerRegistry(r)
                for stage, n in counts.items():
                    if len(await reg.live_workers(stage)) < n:
                        return False
                return True
            finally:
                await r.aclose()

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.services.items():
                if not proc.alive():
                    raise RuntimeError(f"{name} exited:\n{proc.log()[-3000:]}")
            if asyncio.run(check()):
                return
            time.sleep(0.2)
        raise TimeoutError(f"workers {counts} not all alive within {timeout:.0f} s")

    @property
    def session_address(self) -> str:
        return f"127.0.0.1:{self.session_port}"

    def stop(self) -> None:
        for proc in reversed(list(self.services.values())):
            proc.stop()
        for proc in (self.triton, self.redis, self.nats):
            if proc is not None:
                proc.stop()

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
