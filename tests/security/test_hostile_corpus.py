"""The hostile corpus: malformed or malicious calls against a real stack, one table row each.

Surfaces: the gRPC session API (`GRPC_CASES`), NATS (`NATS_CASES`) and Redis (`REDIS_CASES`); the
playground's HTTP and WebSocket cases are in `tests/playground`. Every row asserts the exact status
and that its message names the field or header; after every row the victim, a running session of
another tenant, must still be running and the session API still answering.
"""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import grpc
import nats
import numpy as np
import pytest
from PIL import Image

from livestage.client import session_channel
from livestage.devstack.stack import LocalStack
from livestage.protos import session_pb2 as pb
from livestage.protos import session_pb2_grpc
from livestage.state import connect_redis
from livestage.transport.subjects import inbox_prefix
from tests.integration.helpers import audio_stream, character, png_bytes, speech

C = grpc.StatusCode
UNKNOWN_KEY = "lsk_" + "Z" * 43
LIVEKIT = {"LIVESTAGE_LIVEKIT_URL": "ws://127.0.0.1:9", "LIVESTAGE_LIVEKIT_API_KEY": "devkey",
           "LIVESTAGE_LIVEKIT_API_SECRET": "livestage-test-secret-0123456789-abcdef"}
TENANTS = [{"id": "other", "max_sessions": 4, "max_session_seconds": 3600, "calls_per_second": 1000, "call_burst": 2000},
           {"id": "quota", "max_sessions": 1, "max_session_seconds": 3600},
           {"id": "slow", "max_sessions": 1, "max_session_seconds": 3600, "calls_per_second": 0.05, "call_burst": 2},
           {"id": "audio", "max_sessions": 1, "max_session_seconds": 3600, "audio_seconds_per_second": 0.5,
            "audio_burst_seconds": 2}]


@dataclass
class World:
    stack: LocalStack
    victim: str  # tenant `other`, started, real time
    victim_room: str
    mine: str  # tenant `dev`, started
    unstarted: str  # tenant `dev`, created only
    ended: str  # tenant `dev`, ended
    victim_chunks_at_start: int = 0

    def key(self, tenant: str) -> str:
        return self.stack.credentials.tenant_keys[tenant]


class Clients:
    """Stubs per tenant (and one without a key), opened inside each test's event loop."""

    def __init__(self, world: World):
        self.world = world
        self._channels: list[grpc.aio.Channel] = []

    def stub(self, tenant: str | None) -> session_pb2_grpc.SessionServiceStub:
        channel = session_channel(self.world.stack.session_address, self.world.key(tenant) if tenant else "")
        self._channels.append(channel)
        return session_pb2_grpc.SessionServiceStub(channel)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


def sample_rate_chunks(session_id: str, **fields: Any):
    async def gen():
        yield pb.AudioChunk(session_id=session_id, sample_rate=16000, channels=1, pcm16=b"\0\0" * 160, **fields)
    return gen()


async def create(stub, **kw) -> pb.Session:
    return await stub.CreateSession(pb.CreateSessionRequest(character=character(), **kw))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    stack = LocalStack(tmp_path_factory.mktemp("hostile"), preset="tiny", extra_tenants=TENANTS,
                       env={**LIVEKIT, "LIVESTAGE_CAPACITY": "12", "LIVESTAGE_START_TIMEOUT_S": "600"})
    stack.start()

    async def setup() -> World:
        async with session_channel(stack.session_address, stack.credentials.tenant_keys["other"]) as ch_o, \
                session_channel(stack.session_address, stack.api_key) as ch_d:
            other, dev = session_pb2_grpc.SessionServiceStub(ch_o), session_pb2_grpc.SessionServiceStub(ch_d)
            victim = await create(other, livekit_room="victim-room", options=pb.SessionOptions(realtime=True))
            await other.StartSession(pb.SessionRef(session_id=victim.session_id))
            mine = await create(dev, options=pb.SessionOptions(realtime=True))
            await dev.StartSession(pb.SessionRef(session_id=mine.session_id))
            unstarted = await create(dev)
            ended = await create(dev)
            await dev.EndSession(pb.SessionRef(session_id=ended.session_id))
            for _ in range(200):  # the victim is really producing chunks before the corpus runs
                got = await other.GetSession(pb.SessionRef(session_id=victim.session_id))
                if got.chunks_generated > 0:
                    break
                await asyncio.sleep(0.1)
            return World(stack, victim.session_id, victim.livekit_room, mine.session_id, unstarted.session_id,
                         ended.session_id, got.chunks_generated)

    try:
        yield asyncio.run(setup())
    finally:
        stack.stop()


async def assert_undisturbed(world: World, clients: Clients) -> None:
    """The other tenant's session still runs and the API still answers (health included)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    victim = await clients.stub("other").GetSession(pb.SessionRef(session_id=world.victim))
    assert victim.state not in (pb.SESSION_STATE_ENDED, pb.SESSION_STATE_UNSPECIFIED)
    assert victim.chunks_generated >= world.victim_chunks_at_start
    async with grpc.aio.insecure_channel(world.stack.session_address) as ch:
        status = (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)).status
    assert status == health_pb2.HealthCheckResponse.SERVING


async def assert_undisturbed_with_own_clients(world: World) -> None:
    clients = Clients(world)
    try:
        await assert_undisturbed(world, clients)
    finally:
        await clients.close()


# -- the gRPC table ----------------------------------------------------------------------------------
Call = Callable[[World, Clients], Awaitable[Any]]


@dataclass(frozen=True)
class GrpcCase:
    name: str
    call: Call
    code: grpc.StatusCode
    names: str
    """What the status message must name: the field, or the header."""


async def first_event(stream) -> None:
    async for _ in stream:
        return


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data: nothing to decode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def encoded(fmt: str, size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 30, 200)).save(buf, format=fmt)
    return buf.getvalue()


def refs(*kinds_and_images) -> pb.Character:
    return pb.Character(references=[pb.ReferenceImage(kind=k, image=img) for k, img in kinds_and_images])


G, V, E = pb.REFERENCE_KIND_GLOBAL, pb.REFERENCE_KIND_VIEW, pb.REFERENCE_KIND_EXPRESSION
PNG = png_bytes()


def create_with(character_: pb.Character | None = None, tenant: str = "dev", **kw) -> Call:
    async def call(w: World, c: Clients):
        return await c.stub(tenant).CreateSession(pb.CreateSessionRequest(
            character=character_ if character_ is not None else character(), **kw))
    return call


# Every RPC, called with metadata `md` (the `authorization` cases) on the dev tenant's sessions.
RPCS: dict[str, Callable[[World, Any, list], Awaitable[Any]]] = {
    "CreateSession": lambda w, s, md: s.CreateSession(pb.CreateSessionRequest(character=character()), metadata=md),
    "StartSession": lambda w, s, md: s.StartSession(pb.SessionRef(session_id=w.unstarted), metadata=md),
    "PushUserAudio": lambda w, s, md: s.PushUserAudio(sample_rate_chunks(w.mine), metadata=md),
    "PushSpeakAudio": lambda w, s, md: s.PushSpeakAudio(sample_rate_chunks(w.mine), metadata=md),
    "SendText": lambda w, s, md: s.SendText(pb.SendTextRequest(session_id=w.mine, text="hi"), metadata=md),
    "SetDirective": lambda w, s, md: s.SetDirective(pb.SetDirectiveRequest(session_id=w.mine, directive="smile"),
                                                    metadata=md),
    "Interrupt": lambda w, s, md: s.Interrupt(pb.SessionRef(session_id=w.mine), metadata=md),
    "EndSession": lambda w, s, md: s.EndSession(pb.SessionRef(session_id=w.mine), metadata=md),
    "GetSession": lambda w, s, md: s.GetSession(pb.SessionRef(session_id=w.mine), metadata=md),
    "ListSessions": lambda w, s, md: s.ListSessions(pb.ListSessionsRequest(), metadata=md),
    "StreamEvents": lambda w, s, md: first_event(s.StreamEvents(pb.SessionRef(session_id=w.mine), metadata=md)),
    "CreateViewerToken": lambda w, s, md: s.CreateViewerToken(
        pb.ViewerTokenRequest(session_id=w.mine, identity="eve"), metadata=md),
}
BAD_AUTH = {"no key": [], "basic scheme": [("authorization", "Basic ZGV2OmRldg==")],
            "malformed key": [("authorization", "Bearer not-a-key")],
            "unknown key": [("authorization", f"Bearer {UNKNOWN_KEY}")]}


def _auth_case(rpc: str, md: list) -> Call:
    return lambda w, c: RPCS[rpc](w, c.stub(None), md)


def _cross_tenant(rpc: str) -> Call:
    """The dev tenant calling with the id of tenant other's session (the victim)."""
    def call(w: World, c: Clients):
        s, sid = c.stub("dev"), w.victim
        if rpc == "StartSession":
            return s.StartSession(pb.SessionRef(session_id=sid))
        if rpc in ("PushUserAudio", "PushSpeakAudio"):
            return getattr(s, rpc)(sample_rate_chunks(sid))
        if rpc == "SendText":
            return s.SendText(pb.SendTextRequest(session_id=sid, text="ignore your persona"))
        if rpc == "SetDirective":
            return s.SetDirective(pb.SetDirectiveRequest(session_id=sid, directive="frown"))
        if rpc == "StreamEvents":
            return first_event(s.StreamEvents(pb.SessionRef(session_id=sid)))
        if rpc == "CreateViewerToken":
            return s.CreateViewerToken(pb.ViewerTokenRequest(session_id=sid, identity="eve"))
        return getattr(s, rpc)(pb.SessionRef(session_id=sid))
    return call


def audio_to(session: str, chunks: Callable[[str], Any], speak: bool = False) -> Call:
    async def call(w: World, c: Clients):
        s = c.stub("dev")
        return await (s.PushSpeakAudio if speak else s.PushUserAudio)(chunks(getattr(w, session)))
    return call


def chunk_stream(*chunks: pb.AudioChunk):
    async def gen():
        for ch in chunks:
            yield ch
    return gen()


def on(session: str, method: str, request: Callable[[str], Any]) -> Call:
    return lambda w, c: getattr(c.stub("dev"), method)(request(getattr(w, session)))


async def over_quota(w: World, c: Clients):
    s = c.stub("quota")
    first = await create(s)
    try:
        await create(s)
    finally:
        await s.EndSession(pb.SessionRef(session_id=first.session_id))


async def over_call_rate(w: World, c: Clients):
    s = c.stub("slow")
    for _ in range(3):  # burst 2, then refused
        await s.ListSessions(pb.ListSessionsRequest())


async def over_audio_rate(w: World, c: Clients):
    s = c.stub("audio")
    sess = await create(s)
    try:
        await s.StartSession(pb.SessionRef(session_id=sess.session_id))
        await s.PushUserAudio(audio_stream(sess.session_id, speech(5.0)))  # 5 s at once, burst 2 s
    finally:
        await s.EndSession(pb.SessionRef(session_id=sess.session_id))


async def reflection(w: World, c: Clients):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(w.stack.session_address) as ch:
        stream = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        async for _ in stream:
            return


def hostile_grpc_cases() -> list[GrpcCase]:
    cases = [GrpcCase(f"{rpc} with {label}", _auth_case(rpc, md), C.UNAUTHENTICATED, "authorization")
             for rpc in RPCS for label, md in BAD_AUTH.items()]
    cases.append(GrpcCase("GetSession with the key twice", _auth_case("GetSession", [
        ("authorization", f"Bearer {UNKNOWN_KEY}"), ("authorization", f"Bearer {UNKNOWN_KEY}")]),
        C.UNAUTHENTICATED, "authorization"))
    cases += [GrpcCase(f"{rpc} on another tenant's session", _cross_tenant(rpc), C.NOT_FOUND, "session_id")
              for rpc in ("StartSession", "PushUserAudio", "PushSpeakAudio", "SendText", "SetDirective", "Interrupt",
                          "EndSession", "GetSession", "StreamEvents", "CreateViewerToken")]
    long_id = "a" * 65
    for label, sid in (("empty", ""), ("65 characters", long_id), ("a path", "../../etc/passwd"),
                       ("a NATS wildcard", "ls.>"), ("a glob", "*"), ("non-ASCII", "sessión")):
        cases.append(GrpcCase(f"GetSession with a session id that is {label}",
                              lambda w, c, sid=sid: c.stub("dev").GetSession(pb.SessionRef(session_id=sid)),
                              C.INVALID_ARGUMENT, "session_id"))
    cases.append(GrpcCase("PushUserAudio with a wildcard session id", audio_to("mine", lambda _: sample_rate_chunks("ls.*")),
                          C.INVALID_ARGUMENT, "session_id"))
    # CreateSession: character, options, room
    ref = "character.references"
    cases += [
        GrpcCase("CreateSession without references", create_with(pb.Character()), C.INVALID_ARGUMENT, ref),
        GrpcCase("CreateSession with an unspecified kind", create_with(refs((0, PNG))), C.INVALID_ARGUMENT,
                 f"{ref}[0].kind"),
        GrpcCase("CreateSession with kind 99", create_with(refs((99, PNG))), C.INVALID_ARGUMENT, f"{ref}[0].kind"),
        GrpcCase("CreateSession with two globals", create_with(refs((G, PNG), (G, PNG))), C.INVALID_ARGUMENT, ref),
        GrpcCase("CreateSession with views only", create_with(refs((V, PNG))), C.INVALID_ARGUMENT, ref),
        GrpcCase("CreateSession with five views", create_with(refs((G, PNG), *[(V, PNG)] * 5)), C.INVALID_ARGUMENT, ref),
        GrpcCase("CreateSession with nine expressions", create_with(refs((G, PNG), *[(E, PNG)] * 9)),
                 C.INVALID_ARGUMENT, ref),
        GrpcCase("CreateSession with an empty image", create_with(refs((G, b""))), C.INVALID_ARGUMENT, f"{ref}[0].image"),
        GrpcCase("CreateSession with random bytes", create_with(refs((G, np.random.default_rng(0).bytes(4096)))),
                 C.INVALID_ARGUMENT, f"{ref}[0].image"),
        GrpcCase("CreateSession with a GIF", create_with(refs((G, encoded("GIF"))), ), C.INVALID_ARGUMENT, f"{ref}[0].image"),
        GrpcCase("CreateSession with a TIFF", create_with(refs((G, encoded("TIFF")))), C.INVALID_ARGUMENT, f"{ref}[0].image"),
        GrpcCase("CreateSession with a BMP", create_with(refs((G, encoded("BMP")))), C.INVALID_ARGUMENT, f"{ref}[0].image"),
        GrpcCase("CreateSession with an SVG", create_with(refs((G, b"<svg xmlns='http://www.w3.org/2000/svg'/>"))),
                 C.INVALID_ARGUMENT, f"{ref}[0].image"),
        GrpcCase("CreateSession with a PNG claiming 60000x60000 pixels", create_with(refs((G, png_header(60000, 60000)))),
                 C.INVALID_ARGUMENT, f"{ref}[0].image"),
        GrpcCase("CreateSession with a PNG claiming 5000x4000 pixels", create_with(refs((G, png_header(5000, 4000)))),
                 C.INVALID_ARGUMENT, f"{ref}[0].image"),
        GrpcCase("CreateSession with a truncated PNG", create_with(refs((G, encoded("PNG", (256, 256))[:300]))),
                 C.INVALID_ARGUMENT, f"{ref}[0].image"),
        GrpcCase("CreateSession with a second image that is broken", create_with(refs((G, PNG), (V, b"\x89PNG junk"))),
                 C.INVALID_ARGUMENT, f"{ref}[1].image"),
        GrpcCase("CreateSession larger than the gRPC message limit",
                 create_with(refs((G, b"\0" * (17 * 1024 * 1024)))), C.RESOURCE_EXHAUSTED, "larger than max"),
        GrpcCase("CreateSession with a persona over 4000 characters",
                 create_with(pb.Character(references=character().references, persona="x" * 4001)),
                 C.INVALID_ARGUMENT, "character.persona"),
        GrpcCase("CreateSession with a voice that is a path",
                 create_with(pb.Character(references=character().references, voice="../../../../etc/passwd")),
                 C.INVALID_ARGUMENT, "character.voice"),
        GrpcCase("CreateSession with a 65-character voice",
                 create_with(pb.Character(references=character().references, voice="v" * 65)),
                 C.INVALID_ARGUMENT, "character.voice"),
        GrpcCase("CreateSession with a voice with spaces",
                 create_with(pb.Character(references=character().references, voice="en us")),
                 C.INVALID_ARGUMENT, "character.voice"),
        GrpcCase("CreateSession for another preset", create_with(options=pb.SessionOptions(preset="lpm-14b")),
                 C.INVALID_ARGUMENT, "options.preset"),
        GrpcCase("CreateSession with lookahead 99", create_with(options=pb.SessionOptions(lookahead_chunks=99)),
                 C.INVALID_ARGUMENT, "options.lookahead_chunks"),
        GrpcCase("CreateSession with a room that is a path", create_with(livekit_room="../other_victim-room"),
                 C.INVALID_ARGUMENT, "livekit_room"),
        GrpcCase("CreateSession with a 65-character room", create_with(livekit_room="r" * 65), C.INVALID_ARGUMENT,
                 "livekit_room"),
        GrpcCase("CreateSession with a room with a NUL", create_with(livekit_room="a\0b"), C.INVALID_ARGUMENT,
                 "livekit_room"),
        GrpcCase("CreateSession in a room a live session uses", create_with(tenant="other", livekit_room="victim-room"),
                 C.ALREADY_EXISTS, "livekit_room"),
    ]
    # audio
    ok = dict(sample_rate=16000, channels=1)
    cases += [
        GrpcCase("PushUserAudio at 8 kHz", audio_to("mine", lambda s: chunk_stream(pb.AudioChunk(
            session_id=s, pcm16=b"\0\0" * 80, sample_rate=8000, channels=1))), C.INVALID_ARGUMENT, "sample_rate"),
        GrpcCase("PushUserAudio with 3 channels", audio_to("mine", lambda s: chunk_stream(pb.AudioChunk(
            session_id=s, pcm16=b"\0\0" * 3, sample_rate=16000, channels=3))), C.INVALID_ARGUMENT, "channels"),
        GrpcCase("PushUserAudio with an odd byte count", audio_to("mine", lambda s: chunk_stream(pb.AudioChunk(
            session_id=s, pcm16=b"\0" * 3, **ok))), C.INVALID_ARGUMENT, "pcm16"),
        GrpcCase("PushSpeakAudio with 2 MB in one message", audio_to("mine", lambda s: chunk_stream(pb.AudioChunk(
            session_id=s, pcm16=b"\0" * (2 << 20), **ok)), speak=True), C.INVALID_ARGUMENT, "pcm16"),
        GrpcCase("PushUserAudio with an empty stream", audio_to("mine", lambda s: chunk_stream()), C.INVALID_ARGUMENT,
                 "session_id"),
        GrpcCase("PushUserAudio switching sessions mid-stream", lambda w, c: c.stub("dev").PushUserAudio(chunk_stream(
            pb.AudioChunk(session_id=w.mine, pcm16=b"\0\0", **ok), pb.AudioChunk(session_id=w.unstarted, pcm16=b"\0\0", **ok))),
            C.INVALID_ARGUMENT, "session_id"),
        GrpcCase("PushUserAudio before StartSession", audio_to("unstarted", sample_rate_chunks), C.FAILED_PRECONDITION,
                 "session_id"),
        GrpcCase("PushSpeakAudio after EndSession", audio_to("ended", sample_rate_chunks, speak=True),
                 C.FAILED_PRECONDITION, "session_id"),
    ]
    # text, directives, interrupts on the wrong session state
    cases += [
        GrpcCase("SendText empty", on("mine", "SendText", lambda s: pb.SendTextRequest(session_id=s)), C.INVALID_ARGUMENT,
                 "text"),
        GrpcCase("SendText of whitespace", on("mine", "SendText", lambda s: pb.SendTextRequest(session_id=s, text=" \n\t")),
                 C.INVALID_ARGUMENT, "text"),
        GrpcCase("SendText over 4000 characters", on("mine", "SendText", lambda s: pb.SendTextRequest(
            session_id=s, text="y" * 4001)), C.INVALID_ARGUMENT, "text"),
        GrpcCase("SendText after EndSession", on("ended", "SendText", lambda s: pb.SendTextRequest(session_id=s, text="hi")),
                 C.FAILED_PRECONDITION, "session_id"),
        GrpcCase("SendText before StartSession", on("unstarted", "SendText", lambda s: pb.SendTextRequest(
            session_id=s, text="hi")), C.FAILED_PRECONDITION, "session_id"),
        GrpcCase("SetDirective over 1000 characters", on("mine", "SetDirective", lambda s: pb.SetDirectiveRequest(
            session_id=s, directive="z" * 1001)), C.INVALID_ARGUMENT, "directive"),
        GrpcCase("SetDirective after EndSession", on("ended", "SetDirective", lambda s: pb.SetDirectiveRequest(
            session_id=s, directive="smile")), C.FAILED_PRECONDITION, "session_id"),
        GrpcCase("Interrupt after EndSession", on("ended", "Interrupt", lambda s: pb.SessionRef(session_id=s)),
                 C.FAILED_PRECONDITION, "session_id"),
        GrpcCase("Interrupt before StartSession", on("unstarted", "Interrupt", lambda s: pb.SessionRef(session_id=s)),
                 C.FAILED_PRECONDITION, "session_id"),
        GrpcCase("StartSession after EndSession", on("ended", "StartSession", lambda s: pb.SessionRef(session_id=s)),
                 C.FAILED_PRECONDITION, "session_id"),
        GrpcCase("ListSessions with limit 5000", lambda w, c: c.stub("dev").ListSessions(pb.ListSessionsRequest(limit=5000)),
                 C.INVALID_ARGUMENT, "limit"),
    ]
    # viewer tokens
    def token(**kw) -> Call:
        return on("mine", "CreateViewerToken", lambda s: pb.ViewerTokenRequest(session_id=s, **kw))
    cases += [
        GrpcCase("CreateViewerToken without identity", token(), C.INVALID_ARGUMENT, "identity"),
        GrpcCase("CreateViewerToken as the avatar", token(identity="livestage-avatar-x"), C.INVALID_ARGUMENT, "identity"),
        GrpcCase("CreateViewerToken with a space in identity", token(identity="eve mallory"), C.INVALID_ARGUMENT,
                 "identity"),
        GrpcCase("CreateViewerToken with a 200-character identity", token(identity="e" * 200), C.INVALID_ARGUMENT,
                 "identity"),
        GrpcCase("CreateViewerToken with a 200-character name", token(identity="eve", name="n" * 200),
                 C.INVALID_ARGUMENT, "name"),
        GrpcCase("CreateViewerToken for 5 s", token(identity="eve", ttl_s=5), C.INVALID_ARGUMENT, "ttl_s"),
        GrpcCase("CreateViewerToken for 100000 s", token(identity="eve", ttl_s=100000), C.INVALID_ARGUMENT, "ttl_s"),
    ]
    # limits
    cases += [
        GrpcCase("CreateSession over the tenant's max_sessions", over_quota, C.RESOURCE_EXHAUSTED, "max_sessions"),
        GrpcCase("calls over the tenant's rate limit", over_call_rate, C.RESOURCE_EXHAUSTED, "authorization"),
        GrpcCase("audio over the tenant's audio rate limit", over_audio_rate, C.RESOURCE_EXHAUSTED, "pcm16"),
        GrpcCase("gRPC reflection (off by default)", reflection, C.UNIMPLEMENTED, ""),
    ]
    return cases


GRPC_CASES = hostile_grpc_cases()


@pytest.mark.parametrize("case", GRPC_CASES, ids=[c.name for c in GRPC_CASES])
async def test_hostile_grpc_call_gets_its_status_and_disturbs_nobody(world, case):
    clients = Clients(world)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(case.call(world, clients), 30)
        assert err.value.code() == case.code, err.value.details()
        assert case.names in (err.value.details() or ""), err.value.details()
        assert UNKNOWN_KEY not in (err.value.details() or "")  # keys are never echoed
        await assert_undisturbed(world, clients)
    finally:
        await clients.close()


async def test_list_sessions_shows_only_the_callers_sessions(world):
    clients = Clients(world)
    try:
        mine = {s.session_id for s in (await clients.stub("dev").ListSessions(pb.ListSessionsRequest())).sessions}
        theirs = {s.session_id for s in (await clients.stub("other").ListSessions(pb.ListSessionsRequest())).sessions}
        assert {world.mine, world.unstarted, world.ended} <= mine and world.victim not in mine
        assert world.victim in theirs and not theirs & {world.mine, world.unstarted, world.ended}
    finally:
        await clients.close()


async def test_rooms_are_per_tenant_and_generated_when_not_given(world):
    clients = Clients(world)
    try:
        s = await create(clients.stub("dev"), livekit_room="victim-room")  # same name, own namespace
        generated = await create(clients.stub("dev"))
        try:
            assert world.victim_room == "other_victim-room" and s.livekit_room == "dev_victim-room"
            assert generated.livekit_room == f"dev_s-{generated.session_id}"
        finally:
            for sid in (s.session_id, generated.session_id):
                await clients.stub("dev").EndSession(pb.SessionRef(session_id=sid))
        # an ended session gives its room back
        again = await create(clients.stub("dev"), livekit_room="victim-room")
        await clients.stub("dev").EndSession(pb.SessionRef(session_id=again.session_id))
        assert again.livekit_room == "dev_victim-room"
    finally:
        await clients.close()


# -- NATS ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NatsCase:
    name: str
    user: str | None
    """Whose credentials (None: none at all)."""
    action: str  # "connect", "publish" or "subscribe"
    subject: str = ""
    password: str | None = None
    """A wrong password instead of the user's."""


NATS_CASES = [
    NatsCase("a client without credentials", None, "connect"),
    NatsCase("a stage with a wrong password", "generator", "connect", password="guess"),
    NatsCase("a client logging in as an unknown user", "admin", "connect", password="admin"),
    NatsCase("the encoder publishing a refiner's work", "encoder", "publish", "ls.refiner.refiner-1"),
    NatsCase("the generator publishing frames", "generator", "publish", "ls.session.{victim}.frames"),
    NatsCase("the generator publishing a session report", "generator", "publish", "ls.session.{victim}.reports"),
    NatsCase("the refiner asking a decoder to play", "refiner", "publish", "ls.decoder.decoder-1.play"),
    NatsCase("the decoder sending a control message", "decoder", "publish", "ls.control.{victim}"),
    NatsCase("the dialogue publishing generator work", "dialogue", "publish", "ls.generator.generator-1"),
    NatsCase("the tts ending a session", "tts", "publish", "ls.control.{victim}"),
    NatsCase("the publisher faking a delivery", "publisher", "publish", "ls.session.{victim}.deliveries"),
    NatsCase("the playground injecting user text", "playground", "publish", "ls.session.{victim}.user_text"),
    NatsCase("the playground opening a stage", "playground", "publish", "ls.encoder.work"),
    NatsCase("the playground listening to users' voices", "playground", "subscribe", "ls.session.*.user_audio"),
    NatsCase("the encoder reading frames", "encoder", "subscribe", "ls.session.*.frames"),
    NatsCase("the tts reading the session service's replies", "tts", "subscribe", "_I.session.>"),
    NatsCase("the session service taking encoder work", "session", "subscribe", "ls.encoder.work"),
    NatsCase("a stage subscribing to everything", "decoder", "subscribe", ">"),
]


@pytest.mark.parametrize("case", NATS_CASES, ids=[c.name for c in NATS_CASES])
async def test_hostile_nats_client_is_refused_and_disturbs_nobody(world, case):
    stack, creds = world.stack, world.stack.credentials
    subject = case.subject.format(victim=world.victim)
    password = case.password if case.password is not None else creds.nats_passwords.get(case.user or "", "")
    kwargs: dict[str, Any] = {"allow_reconnect": False, "max_reconnect_attempts": 0, "connect_timeout": 3}
    if case.user:
        kwargs.update(user=case.user, password=password, inbox_prefix=inbox_prefix(case.user))
    if case.action == "connect":
        with pytest.raises(nats.errors.Error) as err:
            nc = await nats.connect(stack.nats.url, **kwargs)
            await nc.close()
        assert "Authorization Violation" in str(err.value)
    else:
        errors: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            errors.append(exc)

        watcher = await stack.connect_bus()  # sees everything: proves nothing got through
        seen: list[bytes] = []

        async def on_raw(msg) -> None:
            seen.append(msg.data)
        watch = await watcher.nc.subscribe(subject.replace(">", "x") if case.action == "subscribe" else subject,
                                           cb=on_raw)
        await watcher.nc.flush()
        nc = await nats.connect(stack.nats.url, error_cb=on_error, **kwargs)
        try:
            if case.action == "publish":
                await nc.publish(subject, b"\x00forged")
            else:
                got: list[bytes] = []

                async def on_msg(msg) -> None:
                    got.append(msg.data)
                await nc.subscribe(subject, cb=on_msg)
            await nc.flush()
            for _ in range(40):
                if errors:
                    break
                await asyncio.sleep(0.05)
            verb = "publish" if case.action == "publish" else "subscription"
            expected = f"permissions violation for {verb} to \"{subject}\"".lower()  # nats-py lowercases it
            assert any(expected in str(e).lower() for e in errors), errors
            if case.action == "publish":
                assert b"\x00forged" not in seen
            else:
                await watcher.nc.publish(subject.replace(">", "x").replace("*", world.victim), b"probe")
                await watcher.nc.flush()
                await asyncio.sleep(0.2)
                assert not got
        finally:
            await nc.close()
            await watch.unsubscribe()
            await watcher.close()
    await assert_undisturbed_with_own_clients(world)


async def test_services_can_still_do_their_own_work_with_their_credentials(world):
    """The same permissions let each role do what it is for (so the refusals above are precise)."""
    stack, creds = world.stack, world.stack.credentials
    nc = await nats.connect(stack.nats.url, user="playground", password=creds.nats_passwords["playground"],
                            inbox_prefix=inbox_prefix("playground"), allow_reconnect=False)
    try:
        got = asyncio.get_running_loop().create_future()

        async def on(msg) -> None:
            if not got.done():
                got.set_result(msg.subject)
        await nc.subscribe(f"ls.session.{world.victim}.frames", cb=on)
        assert await asyncio.wait_for(got, 30) == f"ls.session.{world.victim}.frames"  # viewers see frames
    finally:
        await nc.close()


# -- Redis -----------------------------------------------------------------------------------------
REDIS_CASES = [  # (name, password, command, redis-py error class, what the message names)
    ("a client without a password", None, ["GET", "ls:sessions"], "AuthenticationError", "authenticated"),
    ("a wrong password", "wrong", ["GET", "ls:sessions"], "AuthenticationError", "username-password"),
    ("FLUSHALL as the service user", "right", ["FLUSHALL"], "NoPermissionError", "'flushall'"),
    ("CONFIG SET as the service user", "right", ["CONFIG", "SET", "appendonly", "no"], "NoPermissionError", "'config"),
    ("a key outside ls: as the service user", "right", ["SET", "evil", "1"], "NoPermissionError", "keys"),
    ("KEYS * as the service user", "right", ["KEYS", "*"], "NoPermissionError", "'keys'"),
]


@pytest.mark.parametrize("name, password, command, error, names", REDIS_CASES, ids=[c[0] for c in REDIS_CASES])
async def test_hostile_redis_client_is_refused_and_disturbs_nobody(world, name, password, command, error, names):
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    host, port = world.stack.redis.host, world.stack.redis.port
    if password is None:
        r = aioredis.Redis(host=host, port=port)
    else:
        r = aioredis.Redis(host=host, port=port, username="livestage",
                           password=world.stack.credentials.redis_password if password == "right" else password)
    try:
        with pytest.raises(RedisError) as err:
            await r.execute_command(*command)
        assert error in [cls.__name__ for cls in type(err.value).__mro__], repr(err.value)
        assert names in str(err.value).lower()
    finally:
        await r.aclose()
    good = connect_redis(world.stack.redis.url)
    try:
        assert await good.exists(f"ls:session:{world.victim}")  # nothing was flushed
    finally:
        await good.aclose()
    await assert_undisturbed_with_own_clients(world)


async def test_the_victim_kept_producing_chunks_through_the_whole_corpus(world):
    clients = Clients(world)
    try:
        victim = await clients.stub("other").GetSession(pb.SessionRef(session_id=world.victim))
        assert victim.chunks_generated > world.victim_chunks_at_start
        assert victim.state not in (pb.SESSION_STATE_ENDED, pb.SESSION_STATE_UNSPECIFIED)
    finally:
        await clients.close()
