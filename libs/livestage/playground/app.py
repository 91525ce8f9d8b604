"""The browser playground: a page that shows a session's avatar live and sends the microphone.

Served by `python -m services.playground` (aiohttp). Endpoints:
- `GET /` the page (`?session=<id>`; without one it offers to open a session with the bundled
  sample character);
- `POST /api/sessions` opens and starts such a session, answers `{"session_id"}`;
- `GET /api/sessions/{id}/config` how to watch it: `{"mode": "livekit", "livekit_url", "token"}`
  (a subscribe-only viewer token from the session API) or `{"mode": "stream"}` plus fps, size
  and sample rate;
- `WS /api/sessions/{id}/stream` the project's own stream. Server -> browser, one binary message
  per chunk: 4-byte big-endian header length, a JSON header (`chunk`, `fps`, `speaking`,
  `user_speaking`, `audio_samples`, `jpeg_sizes`), the chunk's speech as 16-bit PCM, then one
  JPEG per frame. Browser -> server: binary 16-bit PCM mono 16 kHz microphone frames (forwarded
  into a `PushUserAudio` stream), and JSON `{"type": "stats", ...}` every half second saying what
  the page actually drew and played (kept for `GET /api/sessions/{id}/stats`);
- `GET /healthz`.
Errors are JSON `{"error": ..., "field": ...}` with a 4xx status; on the socket they are JSON
messages `{"type": "error", ...}` and the socket stays open.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
from importlib import resources
from typing import Any

import grpc
import numpy as np
from aiohttp import WSMsgType, web
from PIL import Image
from pydantic import Field

from livestage.config import Settings
from livestage.observability import get_logger
from livestage.protos import session_pb2 as pb
from livestage.protos import session_pb2_grpc
from livestage.transport import Envelope, NatsBus, Subjects, kind_of, to_numpy
from livestage.transport.codec import is_set

MAX_MIC_MESSAGE = 64 * 1024
_log = get_logger("playground")


class PlaygroundSettings(Settings):
    playground_host: str = "127.0.0.1"
    playground_port: int = Field(8080, ge=0, le=65535)
    session_address: str = "127.0.0.1:50051"
    """host:port of the session service's gRPC API."""
    livekit_js_url: str = "/static/livekit-client.umd.min.js"
    """Where the page loads the LiveKit JS client from in LiveKit mode (not bundled: put the
    `livekit-client` UMD build there, or point this at your CDN)."""
    jpeg_quality: int = Field(80, ge=10, le=95)


def _error(status: int, message: str, field: str = "") -> web.Response:
    return web.json_response({"error": message, "field": field}, status=status)


def encode_chunk(chunk_index: int, frames: np.ndarray, audio: np.ndarray, fps: int, speaking: bool = False,
                 user_speaking: bool = False, quality: int = 80) -> bytes:
    """One chunk as the page reads it (see the module docstring)."""
    jpegs = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
        jpegs.append(buf.getvalue())
    pcm = (np.clip(np.nan_to_num(audio), -1, 1) * 32767).astype("<i2").tobytes()
    header = json.dumps({"chunk": chunk_index, "fps": fps, "speaking": bool(speaking),
                         "user_speaking": bool(user_speaking), "audio_samples": len(pcm) // 2,
                         "jpeg_sizes": [len(j) for j in jpegs]}).encode()
    return struct.pack(">I", len(header)) + header + pcm + b"".join(jpegs)


class Playground:
    def __init__(self, settings: PlaygroundSettings):
        self.settings = settings
        self.bus: NatsBus | None = None
        self.channel: grpc.aio.Channel | None = None
        self.client: session_pb2_grpc.SessionServiceStub | None = None
        self.stats: dict[str, dict[str, Any]] = {}

    async def start(self, app: web.Application) -> None:
        self.bus = await NatsBus.connect(self.settings.nats_url, name="playground")
        self.channel = grpc.aio.insecure_channel(self.settings.session_address)
        self.client = session_pb2_grpc.SessionServiceStub(self.channel)

    async def stop(self, app: web.Application) -> None:
        if self.bus is not None:
            await self.bus.close()
        if self.channel is not None:
            await self.channel.close()

    async def _session(self, session_id: str) -> pb.Session:
        assert self.client is not None
        return await self.client.GetSession(pb.SessionRef(session_id=session_id))

    # -- HTTP --------------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.Response:
        html = (resources.files("livestage.playground") / "static" / "index.html").read_text()
        return web.Response(text=html.replace("{{LIVEKIT_JS_URL}}", self.settings.livekit_js_url),
                            content_type="text/html")

    async def create(self, request: web.Request) -> web.Response:
        from livestage.devstack.demo import SampleCharacter, character_proto

        assert self.client is not None
        sample = SampleCharacter.load()
        try:
            s = await self.client.CreateSession(pb.CreateSessionRequest(
                character=character_proto(sample),
                livekit_room="playground", options=pb.SessionOptions(realtime=True)))
            await self.client.StartSession(pb.SessionRef(session_id=s.session_id))
        except grpc.aio.AioRpcError as exc:
            return _error(503, f"session service: {exc.details()}")
        return web.json_response({"session_id": s.session_id})

    async def config(self, request: web.Request) -> web.Response:
        from livestage.models.config import get_preset

        sid = request.match_info["session_id"]
        try:
            session = await self._session(sid)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return _error(404, f"session {sid!r} not found", "session")
            return _error(400 if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else 503, exc.details(), "session")
        preset = get_preset(session.preset or self.settings.preset)
        out: dict[str, Any] = {"session_id": sid, "fps": preset.chunk.fps, "width": preset.width,
                               "height": preset.height, "sample_rate": preset.chunk.sample_rate,
                               "mode": "stream"}
        if session.livekit_url and session.livekit_room:
            identity = request.query.get("identity") or f"viewer-{id(request) % 100000}"
            assert self.client is not None
            tok = await self.client.CreateViewerToken(pb.ViewerTokenRequest(session_id=sid, identity=identity))
            out.update(mode="livekit", livekit_url=tok.livekit_url, token=tok.token, room=tok.room)
        return web.json_response(out)

    async def get_stats(self, request: web.Request) -> web.Response:
        sid = request.match_info["session_id"]
        if sid not in self.stats:
            return _error(404, f"no page has reported for session {sid!r}", "session")
        return web.json_response(self.stats[sid])

    # -- the stream --------------------------------------------------------------------------
    async def stream(self, request: web.Request) -> web.StreamResponse:
        sid = request.match_info["session_id"]
        try:
            await self._session(sid)
        except grpc.aio.AioRpcError as exc:
            return _error(404 if exc.code() == grpc.StatusCode.NOT_FOUND else 503, exc.details(), "session")
        ws = web.WebSocketResponse(max_msg_size=4 * MAX_MIC_MESSAGE)
        await ws.prepare(request)
        assert self.bus is not None and self.client is not None
        send_lock = asyncio.Lock()

        async def on_frames(env: Envelope, headers: dict[str, str], reply: str) -> None:
            if kind_of(env) != "frame_chunk":
                return
            fc = env.frame_chunk
            try:
                frames = to_numpy(fc.frames, "frames")
                audio = to_numpy(fc.audio, "audio") if is_set(fc.audio) else np.zeros(0, np.float32)
                if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
                    raise ValueError(f"frames: expected uint8 [T, H, W, 3], got {frames.dtype} "
                                     f"{list(frames.shape)}")
            except ValueError as exc:  # a malformed chunk is skipped; the stream goes on
                _log.warning("frames_dropped", session_id=sid, chunk=env.chunk_index, error=str(exc))
                return
            data = await asyncio.to_thread(encode_chunk, env.chunk_index, frames, audio, int(frames.shape[0]),
                                           fc.speaking, fc.user_speaking, self.settings.jpeg_quality)
            async with send_lock:
                if not ws.closed:
                    await ws.send_bytes(data)

        sub = await self.bus.subscribe(Subjects.session_frames(sid), on_frames)
        mic: asyncio.Queue = asyncio.Queue()

        async def mic_frames():
            while True:
                pcm = await mic.get()
                if pcm is None:
                    return
                yield pb.AudioChunk(session_id=sid, pcm16=pcm, sample_rate=16000, channels=1)

        async def push_mic() -> pb.PushAudioSummary:
            assert self.client is not None
            return await self.client.PushUserAudio(mic_frames())

        pusher: asyncio.Task | None = None
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    if len(msg.data) % 2 or len(msg.data) > MAX_MIC_MESSAGE:
                        async with send_lock:
                            await ws.send_json({"type": "error", "field": "pcm16", "error":
                                                f"mic frames are 16-bit PCM up to {MAX_MIC_MESSAGE} bytes, "
                                                f"got {len(msg.data)} bytes"})
                        continue
                    if pusher is None or pusher.done():
                        pusher = asyncio.create_task(push_mic())
                    mic.put_nowait(bytes(msg.data))
                elif msg.type == WSMsgType.TEXT:
                    try:
                        data = json.loads(msg.data)
                    except ValueError:
                        async with send_lock:
                            await ws.send_json({"type": "error", "field": "message", "error": "not JSON"})
                        continue
                    if data.get("type") == "stats":
                        self.stats[sid] = data
        finally:
            await sub.unsubscribe()
            mic.put_nowait(None)
            if pusher is not None:
                try:
                    await asyncio.wait_for(pusher, 5)
                except (asyncio.TimeoutError, grpc.aio.AioRpcError) as exc:
                    _log.warning("mic_stream_ended", session_id=sid, error=repr(exc))
        return ws


def create_app(settings: PlaygroundSettings) -> web.Application:
    pg = Playground(settings)
    app = web.Application()
    app["playground"] = pg
    app.on_startup.append(pg.start)
    app.on_cleanup.append(pg.stop)
    static = resources.files("livestage.playground") / "static"
    app.router.add_get("/", pg.index)
    app.router.add_get("/healthz", lambda r: web.json_response({"ok": True}))
    app.router.add_post("/api/sessions", pg.create)
    app.router.add_get("/api/sessions/{session_id}/config", pg.config)
    app.router.add_get("/api/sessions/{session_id}/stats", pg.get_stats)
    app.router.add_get("/api/sessions/{session_id}/stream", pg.stream)
    app.router.add_static("/static", str(static))
    return app


def run_playground() -> None:
    from livestage.config import load_settings
    from livestage.observability import configure_logging

    settings = load_settings(PlaygroundSettings, service="playground")
    configure_logging("playground", settings.log_level)
    web.run_app(create_app(settings), host=settings.playground_host, port=settings.playground_port,
                print=None)
