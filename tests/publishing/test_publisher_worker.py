"""The publisher worker over a real nats-server, in this process: attach validation, the queue
group it leaves when full and rejoins, a failing sink reported and detached, and interrupts
handled where they arrive (the LiveKit agent's clear, then the session's `Interrupt`)."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest

from livestage.protos import stages_pb2 as spb
from livestage.serving.conversation.publisher import AGENT_CLEAR, PublisherSettings, PublisherWorker
from livestage.serving.process import ServiceProcess
from livestage.transport import NatsBus, NoRespondersError, Subjects, kind_of, tensor, wrap

FPS, SIZE, RATE = 8, 32, 16000


class SpySink:
    """A recording sink that remembers what it was given; `fail` makes `write` raise."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.on_played = None
        self.writes: list[tuple[int, int]] = []
        self.clears: list[int] = []
        self.started = self.closed = False

    async def start(self, width: int, height: int, fps: int, sample_rate: int) -> None:
        self.started = True

    async def write(self, chunk) -> None:
        if self.fail:
            raise OSError("disk full")
        self.writes.append((chunk.chunk_index, chunk.epoch))
        if self.on_played is not None:
            await self.on_played(chunk.chunk_index, float(len(self.writes)))

    async def clear(self, after_chunk: int) -> int:
        self.clears.append(after_chunk)
        return 0

    async def close(self) -> None:
        self.closed = True

    @property
    def position_s(self) -> float:
        return float(len(self.writes))


class SpyPublisher(PublisherWorker):
    def __init__(self, proc: ServiceProcess, fail: bool):
        super().__init__(proc)
        self.fail = fail
        self.sinks: list[SpySink] = []

    def recording_sink(self, path, realtime):
        self.sinks.append(SpySink(self.fail))
        return self.sinks[-1]


async def until(condition, timeout: float = 10.0) -> None:
    async def loop():
        while not condition():
            await asyncio.sleep(0.02)
    await asyncio.wait_for(loop(), timeout)


def frame_chunk(sid: str, k: int, epoch: int = 0):
    frames = np.full((FPS, SIZE, SIZE, 3), k * 20 % 255, np.uint8)
    return wrap(spb.FrameChunk(frames=tensor(frames), audio=tensor(np.zeros(RATE, np.float32)), speaking=True),
                sid, k, epoch)


def attach(sid: str, **overrides):
    body = dict(fps=FPS, width=SIZE, height=SIZE, sample_rate=RATE, realtime=False, lookahead=2)
    body.update(overrides)
    return wrap(spb.AttachSession(publisher=spb.PublisherAttach(**body)), sid)


@pytest.fixture
async def publisher(nats_server, tmp_path, request):
    settings = PublisherSettings(nats_url=nats_server, recordings_dir=str(tmp_path), capacity=1,
                                 worker_id=f"publisher-{uuid.uuid4().hex[:6]}", close_wait_s=2)
    proc = ServiceProcess(settings, "publisher")
    proc.bus = await NatsBus.connect(nats_server)
    worker = SpyPublisher(proc, fail=getattr(request, "param", False))
    await worker.start()
    client = await NatsBus.connect(nats_server)
    yield worker, client
    await worker.drain()
    await client.close()
    await proc.bus.close()


async def settled(worker: PublisherWorker) -> None:
    """The queue group change the worker made in the background has reached the server."""
    await until(lambda: not worker._background)
    await worker.bus.flush()


@pytest.mark.parametrize("publisher", [True], indirect=True)
async def test_a_failing_sink_is_reported_and_the_session_detached(publisher):
    worker, client = publisher
    sid = f"s-{uuid.uuid4().hex[:8]}"
    errors: list = []

    async def on_report(env, headers, reply):
        if kind_of(env) == "worker_error":
            errors.append(env.worker_error)

    await client.subscribe(Subjects.session_reports(sid), on_report)
    refused = await client.request(Subjects.stage_work("publisher"), attach(sid, fps=0))
    assert kind_of(refused) == "stage_error" and refused.stage_error.field == "fps"
    assert "fps: must be 1..120" in refused.stage_error.message
    assert worker.sessions_held() == 0

    answer = await client.request(Subjects.stage_work("publisher"), attach(sid))
    assert kind_of(answer) == "session_attached", answer
    assert answer.session_attached.worker_id == worker.worker_id
    assert answer.session_attached.recording.endswith(f"{sid}.mp4")
    assert worker.sessions_held() == 1
    await settled(worker)  # full (capacity 1): out of the queue group
    with pytest.raises(NoRespondersError):
        await client.request(Subjects.stage_work("publisher"), attach("another"), timeout=2)

    await client.publish(Subjects.session_frames(sid), frame_chunk(sid, 0))
    await until(lambda: errors)
    assert errors[0].code == "publisher_failed" and "disk full" in errors[0].message, errors
    await until(lambda: worker.sessions_held() == 0)
    assert sid not in worker.sessions and worker.sinks[0].closed
    await settled(worker)  # a slot is free again: back in the queue group
    again = await client.request(Subjects.stage_work("publisher"), attach("another"), timeout=5)
    assert kind_of(again) == "session_attached"
    detached = await client.request(Subjects.worker("publisher", worker.worker_id),
                                    wrap(spb.DetachSession(last_chunk=-1), "another"))
    assert kind_of(detached) == "session_detached" and worker.sessions_held() == 0
    assert len(errors) == 1


async def test_an_agent_clear_is_handled_here_and_the_sessions_interrupt_after_it_is_harmless(publisher):
    worker, client = publisher
    sid = f"s-{uuid.uuid4().hex[:8]}"
    requests: list = []

    async def session_commands(env, headers, reply):  # the session: roll back, answer once
        requests.append(env)
        await client.respond(reply, wrap(spb.InterruptDone(last_kept=2), sid))

    played: list[tuple[int, int]] = []

    async def on_playback(env, headers, reply):
        assert kind_of(env) == "playback_report"
        played.append((env.chunk_index, env.epoch))

    await client.subscribe(Subjects.session_commands(sid), session_commands)
    await client.subscribe(Subjects.session_playback(sid), on_playback)
    assert kind_of(await client.request(Subjects.stage_work("publisher"), attach(sid))) == "session_attached"
    session, sink = worker.sessions[sid], worker.sinks[0]
    for k in range(3):
        await client.publish(Subjects.session_frames(sid), frame_chunk(sid, k))
    await until(lambda: len(sink.writes) == 3)
    await until(lambda: len(played) == 3)
    assert played == [(0, 0), (1, 0), (2, 0)]

    await session.agent_clear()  # what the avatar bridge calls on `lk.clear_buffer`
    assert sink.clears == [2]  # cleared at once, here
    await until(lambda: requests)
    assert len(requests) == 1 and kind_of(requests[0]) == "interrupt_request"
    assert requests[0].interrupt_request.reason == AGENT_CLEAR and requests[0].interrupt_request.last_shown == 2

    await client.publish(Subjects.session_frames(sid), frame_chunk(sid, 3, epoch=0))  # stale speech: dropped
    control = Subjects.control(sid)
    await client.publish(control, wrap(spb.Interrupt(last_kept=2, reply=0, reason=AGENT_CLEAR, origin="publisher"),
                                       sid, 2, 1))
    await until(lambda: session.epoch == 1)
    assert sink.clears == [2]  # the session's echo of our own request clears nothing more
    await client.publish(Subjects.session_frames(sid), frame_chunk(sid, 3, epoch=1))
    await until(lambda: len(sink.writes) == 4)
    assert sink.writes == [(0, 0), (1, 0), (2, 0), (3, 1)]

    barge_in = wrap(spb.Interrupt(last_kept=3, reply=1, reason="barge_in", origin="session"), sid, 3, 2)
    await client.publish(control, barge_in)
    await until(lambda: session.epoch == 2)
    assert sink.clears == [2, 3]
    await client.publish(control, barge_in)  # a repeat changes nothing
    await client.publish(Subjects.session_frames(sid), frame_chunk(sid, 4, epoch=2))
    await until(lambda: len(sink.writes) == 5)
    assert sink.clears == [2, 3] and sink.writes[-1] == (4, 2) and len(requests) == 1
    await until(lambda: played[-1] == (4, 2))

    detached = await client.request(Subjects.worker("publisher", worker.worker_id),
                                    wrap(spb.DetachSession(last_chunk=4), sid))
    assert kind_of(detached) == "session_detached" and detached.session_detached.chunks == 5
    assert sink.closed and worker.sessions_held() == 0
