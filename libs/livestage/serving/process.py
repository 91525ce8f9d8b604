"""The skeleton of every service process: settings, logging, tracing, metrics, gRPC health,
NATS and Redis connections, and a graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal
import uuid
from typing import Awaitable, Callable

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from livestage.config import Settings
from livestage.observability import configure_logging, configure_tracing, get_logger, start_metrics_server
from livestage.state import connect_redis
from livestage.transport import NatsBus

GRPC_OPTIONS = [("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.max_send_message_length", 16 * 1024 * 1024)]


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


class ServiceProcess:
    """Owns the connections and lifecycle; a service adds handlers in `setup` and gRPC services
    through `self.grpc_server` before it starts."""

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
        self.grpc_server = grpc.aio.server(options=GRPC_OPTIONS)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        self.bus: NatsBus | None = None
        self.redis = None
        self.grpc_port = 0

    async def _set_health(self, status: int) -> None:
        result = self.health.set("", status)
        if asyncio.iscoroutine(result):
            await result
        result = self.health.set(self.service, status)
        if asyncio.iscoroutine(result):
            await result

    async def run(self, setup: Callable[[], Awaitable[None]],
                  drain: Callable[[], Awaitable[None]] | None = None) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.bus = await NatsBus.connect(self.settings.nats_url, name=self.worker_id)
        self.redis = connect_redis(self.settings.redis_url)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.grpc_port = self.grpc_server.add_insecure_port(
            f"{self.settings.grpc_host}:{self.settings.grpc_port}")
        await setup()
        await self.grpc_server.start()
        start_metrics_server(self.settings.metrics_port)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.log.info("service_started", grpc_port=self.grpc_port, nats=self.settings.nats_url)
        await self.stopping.wait()
        self.log.info("service_draining")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if drain is not None:
            try:
                await asyncio.wait_for(drain(), self.settings.drain_timeout_s)
            except asyncio.TimeoutError:
                self.log.warning("drain_timeout")
        await self.grpc_server.stop(grace=2)
        await self.bus.close()
        await self.redis.aclose()
        self.log.info("service_stopped")
