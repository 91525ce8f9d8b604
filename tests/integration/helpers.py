"""Client-side helpers for the integration tests: gRPC stubs, a frames listener, sample inputs."""

from __future__ import annotations

import asyncio
import io

import grpc
import numpy as np
from PIL import Image

from livestage.client import session_channel
from livestage.media.samples import sample_speech
from livestage.protos import session_pb2 as pb
from livestage.protos import session_pb2_grpc
from livestage.protos import stages_pb2 as spb
from livestage.transport import NatsBus, Subjects, to_numpy


def png_bytes(color=(200, 150, 120), size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def character(color=(200, 150, 120)) -> pb.Character:
    return pb.Character(references=[pb.ReferenceImage(kind=pb.REFERENCE_KIND_GLOBAL, image=png_bytes(color))],
                        persona="a friendly test character")


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    return sample_speech(seconds, 16000, seed)


async def audio_stream(session_id: str, samples: np.ndarray, rate: int = 16000, channels: int = 1,
                       block: int = 16000):
    data = pcm16(samples)
    step = block * 2 * channels
    for i in range(0, max(len(data), 1), step):
        yield pb.AudioChunk(session_id=session_id, pcm16=data[i:i + step], sample_rate=rate, channels=channels)


class FramesListener:
    """Collects (chunk_index, epoch, frames, FrameChunk) for every chunk a session shows."""

    def __init__(self, bus: NatsBus, session_id: str):
        self.bus = bus
        self.session_id = session_id
        self.chunks: list[tuple[int, int, np.ndarray, spb.FrameChunk]] = []
        self.arrived = asyncio.Event()

    async def start(self) -> "FramesListener":
        async def on(msg, headers, reply):
            self.chunks.append((msg.chunk_index, msg.epoch, to_numpy(msg.frame_chunk.frames), msg.frame_chunk))
            self.arrived.set()
        self.sub = await self.bus.subscribe(Subjects.session_frames(self.session_id), on)
        return self

    async def wait_for(self, n: int, timeout: float = 60) -> None:
        await self.wait_until(lambda chunks: len(chunks) >= n, timeout)

    async def wait_until(self, condition, timeout: float = 60) -> None:
        """Waits until `condition(chunks)` holds for the chunks received so far."""
        async def loop():
            while not condition(self.chunks):
                self.arrived.clear()
                await self.arrived.wait()
        await asyncio.wait_for(loop(), timeout)

    @staticmethod
    def worker(chunk: spb.FrameChunk, stage: str) -> str:
        """The worker that computed `stage` for a chunk."""
        return next((t.worker_id for t in chunk.timings if t.stage == stage), "")

    @property
    def indices(self) -> list[int]:
        return [c[0] for c in self.chunks]


def stub(stack, api_key: str | None = None) -> tuple[grpc.aio.Channel, session_pb2_grpc.SessionServiceStub]:
    """A channel and stub to the stack's session API with the dev tenant's key (or `api_key`)."""
    channel = session_channel(stack.session_address, stack.api_key if api_key is None else api_key)
    return channel, session_pb2_grpc.SessionServiceStub(channel)


class BackgroundHttpServer:
    """An aiohttp app served from its own thread and event loop, bound before anything uses it.

    The endpoint a service is configured with must exist before the service starts: binding
    first (port 0, then reading the real port) leaves no window in which another socket can take
    a port that was only probed as free.
    """

    def __init__(self, app):
        import threading

        from aiohttp import web

        self._app = app
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self.port = 0

        async def serve() -> None:
            self._runner = web.AppRunner(self._app)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._ready.set()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the test HTTP server did not start")

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
