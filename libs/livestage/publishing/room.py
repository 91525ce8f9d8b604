"""`RoomLink`: everything of LiveKit that needs a server, behind one seam.

`LiveKitRoomLink` is the real one over `livekit.rtc.Room`; it cannot be exercised here (no LiveKit
server exists on the build machine), so the tests use `LoopbackRoomLink`, which records what would
be published and lets a test play the remote side (byte streams in, RPC invocations in, RPCs out).
Media sources, frames and the A/V synchroniser are real SDK objects in both cases.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

ByteStreamHandler = Callable[["IncomingByteStream"], Awaitable[None]]
RpcHandler = Callable[[str, str], Awaitable[str]]
"""(caller_identity, payload) -> response payload."""


@dataclass
class IncomingByteStream:
    """A byte stream from a participant: its topic attributes and its chunks."""

    sender: str
    attributes: dict[str, str]
    chunks: AsyncIterator[bytes]


class RoomLink(Protocol):
    identity: str

    async def connect(self, url: str, token: str) -> None: ...
    async def publish_track(self, track: Any, options: Any) -> None: ...
    def register_rpc(self, method: str, handler: RpcHandler) -> None: ...
    async def perform_rpc(self, destination_identity: str, method: str, payload: str) -> str: ...
    def on_byte_stream(self, topic: str, handler: ByteStreamHandler) -> None: ...
    async def disconnect(self) -> None: ...


class LiveKitRoomLink:
    """The avatar participant in a real LiveKit room (needs a server: not run in CI)."""

    def __init__(self) -> None:
        from livekit import rtc

        self.room = rtc.Room()
        self.identity = ""
        self._tasks: set[asyncio.Task] = set()

    async def connect(self, url: str, token: str) -> None:
        await self.room.connect(url, token)
        self.identity = self.room.local_participant.identity

    async def publish_track(self, track: Any, options: Any) -> None:
        await self.room.local_participant.publish_track(track, options)

    def register_rpc(self, method: str, handler: RpcHandler) -> None:
        async def invoke(data) -> str:  # rtc.RpcInvocationData
            return await handler(data.caller_identity, data.payload)

        self.room.local_participant.register_rpc_method(method, invoke)

    async def perform_rpc(self, destination_identity: str, method: str, payload: str) -> str:
        return await self.room.local_participant.perform_rpc(
            destination_identity=destination_identity, method=method, payload=payload)

    def on_byte_stream(self, topic: str, handler: ByteStreamHandler) -> None:
        def receive(reader, participant_identity: str) -> None:
            async def chunks() -> AsyncIterator[bytes]:
                async for chunk in reader:
                    yield bytes(chunk)

            stream = IncomingByteStream(participant_identity, dict(reader.info.attributes or {}), chunks())
            task = asyncio.create_task(handler(stream))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self.room.register_byte_stream_handler(topic, receive)

    async def disconnect(self) -> None:
        await self.room.disconnect()


@dataclass
class LoopbackRoomLink:
    """An in-process stand-in for a room: records publications and RPCs, replays remote input."""

    identity: str = "livestage-avatar"
    connected_to: tuple[str, str] | None = None
    published: list[tuple[Any, Any]] = field(default_factory=list)
    rpcs_sent: list[tuple[str, str, str]] = field(default_factory=list)
    rpc_handlers: dict[str, RpcHandler] = field(default_factory=dict)
    stream_handlers: dict[str, ByteStreamHandler] = field(default_factory=dict)
    disconnected: bool = False

    async def connect(self, url: str, token: str) -> None:
        self.connected_to = (url, token)

    async def publish_track(self, track: Any, options: Any) -> None:
        self.published.append((track, options))

    def register_rpc(self, method: str, handler: RpcHandler) -> None:
        self.rpc_handlers[method] = handler

    async def perform_rpc(self, destination_identity: str, method: str, payload: str) -> str:
        self.rpcs_sent.append((destination_identity, method, payload))
        return "ok"

    def on_byte_stream(self, topic: str, handler: ByteStreamHandler) -> None:
        self.stream_handlers[topic] = handler

    async def disconnect(self) -> None:
        self.disconnected = True

    # -- the remote side, for tests --------------------------------------------------------
    async def invoke_rpc(self, method: str, caller: str, payload: str = "") -> str:
        return await self.rpc_handlers[method](caller, payload)

    async def send_byte_stream(self, topic: str, sender: str, attributes: dict[str, str],
                               chunks: list[bytes]) -> None:
        async def gen() -> AsyncIterator[bytes]:
            for c in chunks:
                yield c

        await self.stream_handlers[topic](IncomingByteStream(sender, attributes, gen()))
