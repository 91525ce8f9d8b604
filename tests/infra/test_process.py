"""The one process runner and session-task supervision, against a real nats-server and
redis-server: readiness, heartbeats, drain, and tasks that die taking their session down."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from livestage.config import Settings
from livestage.serving.process import ServiceProcess, SessionTasks
from livestage.state import WorkerRegistry, connect_redis


async def test_a_failing_task_cancels_its_siblings_and_reports_once():
    failures: list[BaseException] = []
    sibling_cancelled = asyncio.Event()

    async def on_failure(exc: BaseException) -> None:
        failures.append(exc)

    async def sibling() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            sibling_cancelled.set()
            raise

    async def dies() -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("sink write failed")

    tasks = await SessionTasks.start("s1", on_failure)
    tasks.spawn(sibling(), "sibling")
    tasks.spawn(dies(), "writer")
    await asyncio.wait_for(sibling_cancelled.wait(), 5)
    for _ in range(50):
        if failures:
            break
        await asyncio.sleep(0.02)
    assert [str(e) for e in failures] == ["sink write failed"]
    assert not tasks.running
    with pytest.raises(RuntimeError, match="ended"):
        tasks.spawn(asyncio.sleep(0), "late")
    await tasks.close()
    assert len(failures) == 1


async def test_a_task_cancelled_on_purpose_or_by_close_is_not_a_failure():
    failures: list[BaseException] = []

    async def on_failure(exc: BaseException) -> None:
        failures.append(exc)

    tasks = await SessionTasks.start("s2", on_failure)
    superseded = tasks.spawn(asyncio.sleep(60), "reply-1")
    keeps = tasks.spawn(asyncio.sleep(60), "listen")
    superseded.cancel()  # a new reply replaced this one
    await asyncio.sleep(0.05)
    assert tasks.running and not keeps.done()
    await tasks.close()
    assert keeps.cancelled() and failures == [] and not tasks.running


class _Worker:
    stage = "probe"

    def __init__(self, proc: ServiceProcess, held: int):
        self.proc = proc
        self.held = held
        self.drained = asyncio.Event()

    async def start(self) -> None:
        return None

    def sessions_held(self) -> int:
        return self.held

    async def drain(self) -> None:
        self.drained.set()


async def test_the_runner_serves_health_beats_and_drains(nats_server, redis_server, unused_tcp_port):
    settings = Settings(nats_url=nats_server, redis_url=redis_server, grpc_port=unused_tcp_port,
                        metrics_port=0, capacity=4, heartbeat_interval_s=0.1, heartbeat_ttl_s=2.0,
                        worker_id="probe-1")
    proc = ServiceProcess(settings, "probe")
    holder: dict[str, _Worker] = {}

    def make(p: ServiceProcess) -> _Worker:
        holder["w"] = _Worker(p, held=1)
        return holder["w"]

    running = asyncio.create_task(proc.run(make))
    r = connect_redis(redis_server)
    registry = WorkerRegistry(r)
    try:
        for _ in range(100):
            live = await registry.live_workers("probe")
            if live:
                break
            await asyncio.sleep(0.05)
        assert [(w.worker_id, w.capacity, w.free) for w in live] == [("probe-1", 4, 3)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{unused_tcp_port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="probe"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        holder["w"].held = 4
        proc.beat_soon()
        for _ in range(100):
            if (await registry.live_workers("probe"))[0].free == 0:
                break
            await asyncio.sleep(0.05)
        assert (await registry.live_workers("probe"))[0].free == 0  # full: nothing more is placed here
        proc.stopping.set()  # what SIGTERM does
        await asyncio.wait_for(running, 20)
        assert holder["w"].drained.is_set()
        assert await registry.live_workers("probe") == []  # deregistered before draining
    finally:
        if not running.done():
            running.cancel()
        await r.aclose()
