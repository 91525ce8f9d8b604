"""The distributed pipeline end to end: real NATS, Redis, gRPC and one process per service."""

from __future__ import annotations

import asyncio
import signal

import grpc
import numpy as np
import pytest

from livestage.models.config import get_preset
from livestage.protos import session_pb2 as pb
from livestage.transport import NatsBus

from .helpers import FramesListener, audio_stream, character, speech, stub

PRESET = get_preset("tiny")
FRAME_SHAPE = (PRESET.chunk.frames_per_chunk, PRESET.height, PRESET.width, 3)


async def _session(client, color=(200, 150, 120), realtime=False, lookahead=2) -> str:
    s = await client.CreateSession(pb.CreateSessionRequest(
        character=character(color), options=pb.SessionOptions(realtime=realtime, lookahead_chunks=lookahead)))
    assert s.state == pb.SESSION_STATE_WARMUP and s.placement.generator and s.weights
    return s.session_id


async def test_chunks_arrive_in_order_with_shapes_and_two_sessions_do_not_mix(stack):
    channel, client = stub(stack)
    bus = await stack.connect_bus()
    a = await _session(client, (250, 20, 20))
    b = await _session(client, (20, 20, 250))
    la, lb = await FramesListener(bus, a).start(), await FramesListener(bus, b).start()
    for sid in (a, b):
        await client.StartSession(pb.SessionRef(session_id=sid))
    await client.PushSpeakAudio(audio_stream(a, speech(30.0)))
    await asyncio.gather(la.wait_for(6), lb.wait_for(6))
    for listener in (la, lb):
        assert listener.indices[:6] == list(range(6))
        assert all(f.shape == FRAME_SHAPE and f.dtype == np.uint8 for _, _, f, _ in listener.chunks)
    # session a was given speech, b was not: the flags (and so the conditions) stayed per session.
    # A non-realtime session may have generated its first chunks before the speech reached it.
    await la.wait_until(lambda chunks: any(m.speaking for _, _, _, m in chunks), timeout=60)
    assert all(not m.speaking for _, _, _, m in lb.chunks)
    # each session's frames come from its own character (seeded weights: a small but real change)
    assert not np.array_equal(la.chunks[0][2], lb.chunks[0][2])
    got = await client.GetSession(pb.SessionRef(session_id=a))
    assert got.chunks_played >= 6 and len(got.sink_chunks) == 3
    listed = await client.ListSessions(pb.ListSessionsRequest())
    assert {a, b} <= {s.session_id for s in listed.sessions}
    for sid in (a, b):
        ended = await client.EndSession(pb.SessionRef(session_id=sid))
        assert ended.state == pb.SESSION_STATE_ENDED
    await bus.close()
    await channel.close()


async def test_failover_after_sigkill_of_the_generator_keeps_chunks_continuous(stack):
    channel, client = stub(stack)
    bus = await stack.connect_bus()
    sid = await _session(client)
    listener = await FramesListener(bus, sid).start()
    await client.StartSession(pb.SessionRef(session_id=sid))
    await client.PushSpeakAudio(audio_stream(sid, speech(20.0)))
    await listener.wait_for(5)
    before = await client.GetSession(pb.SessionRef(session_id=sid))
    victim = before.placement.generator
    assert before.sink_chunks == [0, 1, 2] and before.sink_digest
    stack.services[victim].kill()  # SIGKILL
    await listener.wait_for(14, timeout=90)
    after = await client.GetSession(pb.SessionRef(session_id=sid))
    assert after.placement.generator != victim and after.placement.generator
    idx = listener.indices
    delivered = sorted(set(idx))
    assert delivered == list(range(len(delivered))), f"missing chunk indices in {idx}"
    assert idx == sorted(idx), "chunks must be published in order"
    assert after.sink_chunks == [0, 1, 2] and after.sink_digest == before.sink_digest
    workers = {listener.worker(m, "generator") for _, _, _, m in listener.chunks}
    assert {victim, after.placement.generator} <= workers
    await client.EndSession(pb.SessionRef(session_id=sid))
    # bring a generator back for the other tests
    stack.start_stage("generator", victim)
    await bus.close()
    await channel.close()


async def test_failover_of_the_encoder_keeps_the_audio_it_held(stack):
    stack.start_stage("encoder", "encoder-2")
    await asyncio.to_thread(stack.wait_for_workers, {"encoder": 2}, 60)
    channel, client = stub(stack)
    bus = await stack.connect_bus()
    sid = await _session(client)
    listener = await FramesListener(bus, sid).start()
    await client.StartSession(pb.SessionRef(session_id=sid))
    await client.PushSpeakAudio(audio_stream(sid, speech(30.0)))  # all of it reaches the encoder at once
    await listener.wait_for(5)
    victim = (await client.GetSession(pb.SessionRef(session_id=sid))).placement.encoder
    assert victim
    stack.services[victim].kill()  # SIGKILL: the speech it held is gone with it
    n = len(listener.chunks)
    await listener.wait_for(n + 8, timeout=90)
    after = await client.GetSession(pb.SessionRef(session_id=sid))
    assert after.placement.encoder not in ("", victim)
    delivered = sorted(set(listener.indices))
    assert delivered == list(range(len(delivered))), f"missing chunk indices in {listener.indices}"
    # the new encoder was handed the audio the runtime still held: the character keeps speaking
    assert all(m.speaking for _, _, _, m in listener.chunks[n + 2:n + 8])
    await client.EndSession(pb.SessionRef(session_id=sid))
    await bus.close()
    await channel.close()


async def test_interrupt_drops_speech_within_a_chunk_and_goes_back_to_listening(stack):
    channel, client = stub(stack)
    bus = await stack.connect_bus()
    sid = await _session(client, realtime=True, lookahead=2)
    listener = await FramesListener(bus, sid).start()
    events: list[pb.SessionEvent] = []

    async def collect():
        async for ev in client.StreamEvents(pb.SessionRef(session_id=sid)):
            events.append(ev)

    collector = asyncio.create_task(collect())
    await asyncio.sleep(0.2)
    await client.StartSession(pb.SessionRef(session_id=sid))
    await client.PushSpeakAudio(audio_stream(sid, speech(10.0)))
    # wait until the character is visibly answering (chunks submitted before the speech arrived
    # are silent), then interrupt it
    for _ in range(20):
        await listener.wait_for(len(listener.chunks) + 1, timeout=30)
        if listener.chunks[-1][3].speaking:
            break
    assert listener.chunks[-1][3].speaking
    reply = await client.Interrupt(pb.SessionRef(session_id=sid))
    last_kept = reply.last_kept_chunk
    await listener.wait_for(len(listener.chunks) + 3, timeout=30)
    after = [(k, e, m) for k, e, _, m in listener.chunks if k > last_kept]
    assert after, "chunks after the interrupt must keep coming"
    assert all(not m.speaking and e >= 1 for k, e, m in after), after
    await client.EndSession(pb.SessionRef(session_id=sid))
    await asyncio.wait_for(collector, 10)
    changes = [(e.state_changed.previous, e.state_changed.current) for e in events
               if e.WhichOneof("event") == "state_changed"]
    assert (pb.SESSION_STATE_RESPONDING, pb.SESSION_STATE_LISTENING) in changes
    assert any(e.WhichOneof("event") == "chunk_timing" and e.chunk_timing.end_to_end_ms > 0 for e in events)
    await bus.close()
    await channel.close()


async def test_bad_input_gets_a_clear_status_and_other_sessions_keep_working(stack):
    channel, client = stub(stack)
    bus = await stack.connect_bus()
    healthy = await _session(client)
    listener = await FramesListener(bus, healthy).start()
    await client.StartSession(pb.SessionRef(session_id=healthy))

    async def status_of(coro):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await coro
        return err.value.code(), err.value.details()

    code, msg = await status_of(client.GetSession(pb.SessionRef(session_id="nope")))
    assert code == grpc.StatusCode.NOT_FOUND and "session_id" in msg and "nope" in msg
    code, msg = await status_of(client.Interrupt(pb.SessionRef(session_id="nope")))
    assert code == grpc.StatusCode.NOT_FOUND
    bad_image = pb.Character(references=[pb.ReferenceImage(kind=pb.REFERENCE_KIND_GLOBAL, image=b"\x89PNGjunk")])
    code, msg = await status_of(client.CreateSession(pb.CreateSessionRequest(character=bad_image)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "character.references[0].image" in msg
    code, msg = await status_of(client.CreateSession(pb.CreateSessionRequest(character=pb.Character())))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "character.references" in msg
    two_globals = character()
    two_globals.references.append(two_globals.references[0])
    code, msg = await status_of(client.CreateSession(pb.CreateSessionRequest(character=two_globals)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "at most 1 global" in msg
    code, msg = await status_of(client.CreateSession(pb.CreateSessionRequest(
        character=character(), options=pb.SessionOptions(preset="lpm-14b"))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "options.preset" in msg

    fresh = await _session(client)
    code, msg = await status_of(client.PushUserAudio(audio_stream(fresh, speech(1.0))))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "StartSession" in msg
    code, msg = await status_of(client.PushUserAudio(audio_stream(healthy, speech(1.0), rate=44100)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "sample_rate" in msg and "44100" in msg
    code, msg = await status_of(client.PushUserAudio(audio_stream(healthy, speech(40.0), block=16000 * 40)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "pcm16" in msg

    async def odd_bytes():
        yield pb.AudioChunk(session_id=healthy, pcm16=b"\x00\x01\x02", sample_rate=16000, channels=1)
    code, msg = await status_of(client.PushUserAudio(odd_bytes()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "pcm16" in msg
    code, msg = await status_of(client.PushUserAudio(audio_stream(healthy, speech(1.0), channels=3)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "channels" in msg

    # the healthy session kept streaming through all of that, and accepts good audio
    ok = await client.PushUserAudio(audio_stream(healthy, speech(1.0)))
    assert ok.samples_accepted == 16000
    n = len(listener.chunks)
    await listener.wait_for(n + 2, timeout=30)
    assert listener.indices == list(range(len(listener.indices)))
    for sid in (healthy, fresh):
        await client.EndSession(pb.SessionRef(session_id=sid))
    await bus.close()
    await channel.close()


async def test_health_checks_and_graceful_shutdown_of_a_worker(stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from livestage.state import WorkerRegistry, connect_redis

    channel = grpc.aio.insecure_channel(stack.session_address)
    health = health_pb2_grpc.HealthStub(channel)
    resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    await channel.close()

    extra = stack.start_stage("refiner", "refiner-extra")
    r = connect_redis(stack.redis.url)
    registry = WorkerRegistry(r)
    for _ in range(200):
        if await registry.is_alive("refiner-extra"):
            break
        await asyncio.sleep(0.1)
    assert await registry.is_alive("refiner-extra")
    port = int(extra.extra["grpc_port"])
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    assert (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())).status == \
        health_pb2.HealthCheckResponse.SERVING
    await ch.close()
    extra.proc.send_signal(signal.SIGTERM)
    assert extra.proc.wait(30) == 0, extra.log()[-2000:]
    assert not await registry.is_alive("refiner-extra")  # deregistered on drain, not left to expire
    assert "service_stopped" in extra.log()
    await r.aclose()


async def test_calls_on_an_ended_session_and_bad_character_fields_get_clear_statuses(stack):
    channel, client = stub(stack)

    async def status_of(coro):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await coro
        return err.value.code(), err.value.details()

    sid = await _session(client)
    await client.StartSession(pb.SessionRef(session_id=sid))
    first = await client.EndSession(pb.SessionRef(session_id=sid))
    again = await client.EndSession(pb.SessionRef(session_id=sid))  # idempotent, no internal error
    assert first.state == again.state == pb.SESSION_STATE_ENDED

    async def drain_events():
        return [ev async for ev in client.StreamEvents(pb.SessionRef(session_id=sid))]
    assert await asyncio.wait_for(drain_events(), 10) == []  # closes at once, never hangs
    for call in (client.SendText(pb.SendTextRequest(session_id=sid, text="hello")),
                 client.SetDirective(pb.SetDirectiveRequest(session_id=sid, directive="smile")),
                 client.Interrupt(pb.SessionRef(session_id=sid))):
        code, msg = await status_of(call)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "session_id" in msg and "ended" in msg
    long_persona = character()
    long_persona.persona = "x" * 4001
    code, msg = await status_of(client.CreateSession(pb.CreateSessionRequest(character=long_persona)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "character.persona" in msg
    for voice in ("../../../../etc/passwd", "a/b", "v" * 65):
        bad_voice = character()
        bad_voice.voice = voice
        code, msg = await status_of(client.CreateSession(pb.CreateSessionRequest(character=bad_voice)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "character.voice" in msg, voice
    ok_voice = character()
    ok_voice.voice = "en_US-joe-medium"
    fine = await client.CreateSession(pb.CreateSessionRequest(character=ok_voice))
    await client.EndSession(pb.SessionRef(session_id=fine.session_id))
    await channel.close()


async def test_sessions_nobody_starts_end_by_themselves_and_free_their_slots(stack):
    channel, client = stub(stack)
    held: list[str] = []
    refused = None
    for _ in range(12):  # fill the single refiner/decoder (4 slots each) with unstarted sessions
        try:
            held.append((await client.CreateSession(pb.CreateSessionRequest(character=character()))).session_id)
        except grpc.aio.AioRpcError as exc:
            refused = exc
            break
    assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE and held
    await asyncio.sleep(10)  # LIVESTAGE_START_TIMEOUT_S=8 in this stack
    for sid in held:
        assert (await client.GetSession(pb.SessionRef(session_id=sid))).state == pb.SESSION_STATE_ENDED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.StartSession(pb.SessionRef(session_id=held[0]))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "ended" in err.value.details()
    fresh = await _session(client)  # the slots are free again
    await client.StartSession(pb.SessionRef(session_id=fresh))
    await client.EndSession(pb.SessionRef(session_id=fresh))
    await channel.close()
