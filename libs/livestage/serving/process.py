"""The one process runner every LiveStage service uses.

`run_service(name, SettingsClass, make_worker, load=...)` is the whole `main` of a service:
typed settings from `LIVESTAGE_*` variables, structlog JSON logging, OpenTelemetry tracing,
Prometheus metrics, gRPC health (NOT_SERVING until the worker started, and again while draining),
NATS and Redis connections, one heartbeat loop for workers that hold sessions, and a graceful
drain on SIGTERM/SIGINT. A service only writes its `ServiceWorker`: `start()` subscribes,
`drain()` lets go of what it holds, `sessions_held()` says how full it is (None: it holds none and
sends no heartbeats).

`SessionTasks` is the other half of the plumbing: the tasks of one session run in one
`asyncio.TaskGroup`, so a task that dies takes its session down with a clear reason instead of
failing silently while the others go on.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from typing import Any, Awaitable, Callable, Coroutine, Protocol

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from livestage.config import Settings
from livestage.observability import (METRICS, configure_logging, configure_tracing, get_logger,
                                     start_metrics_server)
from livestage.state import WorkerInfo, WorkerRegistry, redis_from_settings
from livestage.transport import NatsBus, Subjects



def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """Server (and client) channel options: the message size limit from settings."""
    size = settings.grpc_max_message_bytes
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]


def grpc_server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (mutual with a client CA) from `LIVESTAGE_GRPC_TLS_*`; None: plaintext (loopback/dev)."""
    if not settings.grpc_tls_cert:
        return None
    from pathlib import Path

    chain = Path(settings.grpc_tls_cert).read_bytes()
    key = Path(settings.grpc_tls_key).read_bytes()
    client_ca = Path(settings.grpc_tls_client_ca).read_bytes() if settings.grpc_tls_client_ca else None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)

_instrumented = False


def instrument_grpc() -> None:
    """OpenTelemetry spans for every gRPC call (server and client), trace context in metadata."""
    global _instrumented
    if _instrumented:
        return
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcAioInstrumentorServer

    GrpcAioInstrumentorServer().instrument()
    GrpcAioInstrumentorClient().instrument()
    _instrumented = True


class ServiceWorker(Protocol):
    """What a service plugs into its process."""

    stage: str

    async def start(self) -> None:
        """Subscribes and registers gRPC services; runs once NATS and Redis are connected."""

    async def drain(self) -> None:
        """SIGTERM: stop taking work and let go of what is held (heartbeats already stopped)."""

    def sessions_held(self) -> int | None:
        """Sessions held now, for the heartbeat's free slots; None: no heartbeats."""


class ServiceProcess:
    """Owns a service's connections and lifecycle (see the module docstring)."""

    def __init__(self, settings: Settings, service: str):
        self.settings = settings
        self.service = service
        self.worker_id = settings.worker_id or f"{service}-{uuid.uuid4().hex[:8]}"
        configure_logging(service, settings.log_level)
        configure_tracing(service)
        self.log = get_logger(service).bind(worker_id=self.worker_id)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.stopping = asyncio.Event()
        instrument_grpc()
        self.grpc_server = grpc.aio.server(options=grpc_options(settings))
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        self.bus: NatsBus = None  # type: ignore[assignment]  # set by run() before start()
        self.redis: Any = None
        self.registry: WorkerRegistry = None  # type: ignore[assignment]
        self.grpc_port = 0
        self._worker: ServiceWorker | None = None
        self._beat_now = asyncio.Event()

    @property
    def subject(self) -> str:
        """This worker's own subject (requests for the sessions it holds)."""
        return Subjects.worker(self.service, self.worker_id)

    async def _set_health(self, status: int) -> None:
        for name in ("", self.service):
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    # -- heartbeats ----------------------------------------------------------------------------
    async def heartbeat(self) -> None:
        """Advertises liveness and free slots now (placement reads them from Redis)."""
        worker = self._worker
        held = worker.sessions_held() if worker is not None else None
        if held is None or self.stopping.is_set():
            return
        capacity = self.settings.capacity
        await self.registry.heartbeat(WorkerInfo(self.worker_id, self.service, capacity,
                                                 max(capacity - held, 0), self.subject))
        METRICS.sessions_per_worker.labels(stage=self.service, worker_id=self.worker_id).set(held)

    def beat_soon(self) -> None:
        """Asks the heartbeat loop for a beat now (a session was opened or closed)."""
        self._beat_now.set()

    async def _heartbeat_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                await self.heartbeat()
            except Exception as exc:  # Redis restarting: keep serving, try again next beat
                self.log.warning("heartbeat_failed", error=repr(exc))
            self._beat_now.clear()
            try:
                await asyncio.wait_for(self._beat_now.wait(), self.settings.heartbeat_interval_s)
            except asyncio.TimeoutError:
                pass

    # -- lifecycle -----------------------------------------------------------------------------
    async def run(self, make_worker: Callable[["ServiceProcess"], ServiceWorker]) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.bus = await NatsBus.from_settings(self.settings, name=self.worker_id)
        self.redis = redis_from_settings(self.settings)
        self.registry = WorkerRegistry(self.redis, self.settings.heartbeat_ttl_s)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        credentials = grpc_server_credentials(self.settings)
        self.grpc_port = (self.grpc_server.add_secure_port(address, credentials) if credentials is not None
                          else self.grpc_server.add_insecure_port(address))
        worker = make_worker(self)
        self._worker = worker
        await worker.start()
        await self.grpc_server.start()
        start_metrics_server(self.settings.metrics_port)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.log.info("service_started", grpc_port=self.grpc_port, nats=self.settings.nats_url)
        beats = asyncio.create_task(self._heartbeat_loop())
        await self.stopping.wait()
        self.log.info("service_draining")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        beats.cancel()
        if worker.sessions_held() is not None:
            try:
                await self.registry.deregister(self.worker_id, self.service)
            except Exception as exc:
                self.log.warning("deregister_failed", error=repr(exc))
        try:
            await asyncio.wait_for(worker.drain(), self.settings.drain_timeout_s)
        except asyncio.TimeoutError:
            self.log.warning("drain_timeout")
        await self.grpc_server.stop(grace=2)
        await self.bus.close()
        await self.redis.aclose()
        self.log.info("service_stopped")


def run_service(service: str, settings_cls: type[Settings],
                make_worker: Callable[[ServiceProcess, Any], ServiceWorker],
                load: Callable[[Any], Any] | None = None) -> None:
    """Entry point of `python -m services.<service>`: settings, then what every session of the
    worker shares (`load(settings)`, e.g. models, run in a thread before connecting), then the
    process with its worker."""
    from livestage.config import load_settings

    settings = load_settings(settings_cls, service=service)

    async def main() -> None:
        proc = ServiceProcess(settings, service)
        shared = await asyncio.to_thread(load, settings) if load is not None else None
        await proc.run(lambda p: make_worker(p, shared))

    asyncio.run(main())


class SessionTasks:
    """The tasks of one session, supervised by one `asyncio.TaskGroup`.

    The first task that raises cancels its siblings and `on_failure(exc)` runs once (the owner
    reports the failure as a session event and ends the session). A task cancelled on purpose
    (a reply superseded by a new one) is not a failure. `close()` cancels whatever still runs.
    """

    def __init__(self, name: str, on_failure: Callable[[BaseException], Awaitable[None]]):
        """Use `await SessionTasks.start(...)`, which returns once tasks can be spawned."""
        self.name = name
        self._on_failure = on_failure
        self._group: asyncio.TaskGroup | None = None
        self._ready = asyncio.Event()
        self._closing = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self.failure: BaseException | None = None
        self._host = asyncio.create_task(self._run(), name=f"{name}:tasks")

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                self._ready.set()
                await self._closing.wait()
        except BaseExceptionGroup as eg:  # noqa: F821 - builtin since 3.11
            self.failure = eg.exceptions[0]
        except asyncio.CancelledError:
            return
        finally:
            self._group = None
            self._ready.set()
        if self.failure is not None and not self._closing.is_set():
            try:
                await self._on_failure(self.failure)
            except Exception:
                get_logger("livestage.tasks").exception("session_failure_handler_failed", tasks=self.name)

    @classmethod
    async def start(cls, name: str, on_failure: Callable[[BaseException], Awaitable[None]]) -> "SessionTasks":
        tasks = cls(name, on_failure)
        await tasks._ready.wait()
        return tasks

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str = "") -> asyncio.Task:
        """Starts `coro` under supervision (raises RuntimeError once the group has ended)."""
        if self._group is None:
            coro.close()
            raise RuntimeError(f"{self.name}: session tasks have ended")
        task = self._group.create_task(coro, name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def running(self) -> bool:
        return not self._host.done()

    async def close(self) -> None:
        """Cancels every task and waits for them (no failure is reported for these)."""
        self._closing.set()
        for task in list(self._tasks):
            task.cancel()
        try:
            await self._host
        except asyncio.CancelledError:
            pass
