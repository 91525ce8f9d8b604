"""`LocalStack`: nats-server, redis-server and every LiveStage service as separate processes on
loopback. Used by `make up` (the local launcher), the integration tests and the benchmarks."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from livestage.devstack.datastores import free_port, start_nats, start_redis
from livestage.devstack.servers import ManagedProcess, start_service
from livestage.state import WorkerRegistry, connect_redis

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

    def start_stage(self, stage: str, worker_id: str) -> ManagedProcess:
        port = free_port()
        env = {**self.base_env(), "LIVESTAGE_WORKER_ID": worker_id, "LIVESTAGE_GRPC_PORT": str(port)}
        proc = start_service(stage, env, self.workdir / "logs", tag=worker_id)
        proc.extra["grpc_port"] = port
        self.services[worker_id] = proc
        return proc

    def start(self, timeout: float = 120.0) -> "LocalStack":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.nats = start_nats(self.workdir / "nats")
        self.redis = start_redis(self.workdir / "redis")
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
            env = {**self.base_env(), "LIVESTAGE_GRPC_PORT": str(self.session_port),
                   "LIVESTAGE_WORKER_ID": "session-1"}
            self.services["session"] = start_service("session", env, self.workdir / "logs",
                                                     wait_port=self.session_port)
            if self.playground:
                self.playground_port = self.playground_port or free_port()
                env = {**self.base_env(), "LIVESTAGE_SESSION_ADDRESS": self.session_address,
                       "LIVESTAGE_PLAYGROUND_PORT": str(self.playground_port)}
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
