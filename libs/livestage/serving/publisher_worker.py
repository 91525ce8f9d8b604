"""The `publisher` service: a session's frames and speech out to its viewers.

With `LIVESTAGE_LIVEKIT_URL` set it joins the session's LiveKit room as the avatar participant
(token minted from the API key/secret), publishes one audio and one video track in sync, and
speaks LiveKit's avatar data-stream protocol, so a LiveKit Agents voice agent can use the avatar as
its audio output: `lk.audio_stream` byte streams become the character's speech, `lk.clear_buffer`
interrupts the session, and `lk.playback_started` / `lk.playback_finished` are reported back.
Without a LiveKit URL it records the session to `<recordings_dir>/<session_id>.mp4`.

Either way it reports the playback position (`session.playback`) so generation stays a bounded
number of chunks ahead of what viewers see, and on an interrupt it drops whatever it had queued
beyond the last chunk kept.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from livestage.config import Settings
from livestage.media.audio import resample_audio
from livestage.serving.attached_worker import AttachError, SessionAttachedWorker, run_attached_service
from livestage.serving.process import ServiceProcess
from livestage.transport import StageMessage, Subjects

MAX_DIMENSION = 4096


class PublisherSettings(Settings):
    recordings_dir: str = "recordings"
    """Where sessions are recorded as MP4 when no LiveKit URL is configured."""
    avatar_identity: str = "livestage-avatar"
    close_wait_s: float = Field(10.0, ge=0)
    """On `close`, how long to wait for the last chunks still in flight before finalising."""


@dataclass
class PublishedSession:
    session_id: str
    sink: Any
    fps: int
    sample_rate: int
    worker: "PublisherWorker"
    epoch: int = 0
    last_written: int = -1
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    writer: asyncio.Task | None = None
    subs: list[Any] = field(default_factory=list)
    recording: str = ""
    bridge: Any = None
    room: Any = None
    external_reply: int = 1_000_000
    """Reply ids for speech from a LiveKit agent (kept apart from the dialogue's own ids)."""
    speaking: bool = False
    written: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_frames(self, msg: StageMessage, headers: dict, reply: str) -> None:
        from livestage.publishing import AVChunk

        if msg.epoch < self.epoch:
            return  # generated before an interrupt
        frames, audio = msg.tensors.get("frames"), msg.tensors.get("audio")
        if frames is None or audio is None:
            return
        self.queue.put_nowait((AVChunk(chunk_index=msg.chunk_index, frames=frames,
                                       audio=np.asarray(audio, np.float32), sample_rate=self.sample_rate,
                                       fps=self.fps, epoch=msg.epoch), msg.meta.get("speaking") == "1"))

    async def write_loop(self) -> None:
        while True:
            chunk, speaking = await self.queue.get()
            if chunk.epoch < self.epoch or chunk.chunk_index <= self.last_written:
                continue
            await self.sink.write(chunk)
            self.last_written = chunk.chunk_index
            self.written.set()
            if self.bridge is not None and speaking != self.speaking:
                self.speaking = speaking
                with contextlib.suppress(Exception):
                    if speaking:
                        await self.bridge.notify_playback_started()
                    else:
                        await self.bridge.notify_playback_finished(self.sink.position_s, False)

    async def report_played(self, chunk_index: int, position_s: float) -> None:
        """The sink started playing `chunk_index`: tell the session runtime (lookahead)."""
        await self.worker.bus.publish(Subjects.session_playback(self.session_id), StageMessage(
            "playback", self.session_id, chunk_index, self.epoch, meta={"position_s": f"{position_s:.3f}"}))

    async def wait_written(self, last_chunk: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.last_written < last_chunk and loop.time() < deadline:
            self.written.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.written.wait(), max(deadline - loop.time(), 0.01))

    # -- LiveKit agent side (avatar data-stream protocol) ---------------------------------
    async def agent_audio(self, samples: np.ndarray, sample_rate: int) -> None:
        audio = resample_audio(samples, sample_rate, self.sample_rate)
        await self.worker.bus.publish(Subjects.session_speak_audio(self.session_id), StageMessage(
            "speak_audio", self.session_id, meta={"reply": str(self.external_reply),
                                                  "sample_rate": str(self.sample_rate)},
            tensors={"audio": audio}))

    async def agent_segment_end(self) -> None:
        self.external_reply += 1

    async def agent_clear(self) -> None:
        await self.worker.bus.publish(Subjects.session_commands(self.session_id), StageMessage(
            "command", self.session_id, meta={"action": "interrupt", "reason": "lk.clear_buffer"}))
        if self.bridge is not None:
            with contextlib.suppress(Exception):
                await self.bridge.notify_playback_finished(self.sink.position_s, True)


class PublisherWorker(SessionAttachedWorker[PublishedSession]):
    stage = "publisher"

    def __init__(self, proc: ServiceProcess):
        super().__init__(proc)
        self.settings: PublisherSettings = proc.settings  # type: ignore[assignment]

    @staticmethod
    def _int(msg: StageMessage, name: str, low: int, high: int) -> int:
        raw = msg.meta.get(name, "")
        try:
            value = int(raw)
        except ValueError:
            raise AttachError(f"{name}: not an integer ({raw!r})") from None
        if not low <= value <= high:
            raise AttachError(f"{name}: must be {low}..{high}, got {value}")
        return value

    async def open_session(self, msg: StageMessage) -> tuple[PublishedSession, dict[str, str]]:
        from livestage.publishing import (AvatarDataStreamBridge, LiveKitRoomLink, LiveKitSink,
                                          Mp4RecorderSink, avatar_token)

        fps = self._int(msg, "fps", 1, 120)
        width = self._int(msg, "width", 8, MAX_DIMENSION)
        height = self._int(msg, "height", 8, MAX_DIMENSION)
        rate = self._int(msg, "sample_rate", 8000, 48000)
        realtime = msg.meta.get("realtime") == "1"
        room_name = msg.meta.get("livekit_room", "")
        s = self.settings
        meta: dict[str, str] = {}
        if s.livekit_url:
            if not room_name:
                raise AttachError("livekit_room: required when LiveKit is configured")
            room = LiveKitRoomLink()
            await room.connect(s.livekit_url, avatar_token(s.livekit_api_key, s.livekit_api_secret,
                                                           room_name, identity=s.avatar_identity))
            sink = LiveKitSink(room)
            session = PublishedSession(msg.session_id, sink, fps, rate, self, room=room)
            session.bridge = AvatarDataStreamBridge(room, on_audio=session.agent_audio,
                                                    on_segment_end=session.agent_segment_end,
                                                    on_clear=session.agent_clear)
        else:
            path = Path(s.recordings_dir).resolve() / f"{msg.session_id}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            sink = Mp4RecorderSink(path, realtime=realtime)
            session = PublishedSession(msg.session_id, sink, fps, rate, self, recording=str(path))
            meta["recording"] = str(path)
        sink.on_played = session.report_played
        await sink.start(width, height, fps, rate)
        session.subs = [await self.bus.subscribe(Subjects.session_frames(msg.session_id), session.on_frames)]
        session.writer = asyncio.create_task(session.write_loop())
        return session, meta

    async def close_session(self, session: PublishedSession, msg: StageMessage) -> dict[str, str]:
        if msg.chunk_index >= 0:
            await session.wait_written(msg.chunk_index, self.settings.close_wait_s)
        for sub in session.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if session.writer is not None:
            session.writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await session.writer
        await session.sink.close()
        if session.room is not None:
            with contextlib.suppress(Exception):
                await session.room.disconnect()
        return {"recording": session.recording, "chunks": str(session.last_written + 1)}

    async def on_control(self, session: PublishedSession, msg: StageMessage) -> None:
        if msg.meta.get("action") == "interrupt":
            session.epoch = max(session.epoch, msg.epoch)
            session.last_written = min(session.last_written, msg.chunk_index)
            dropped = await session.sink.clear(msg.chunk_index)
            self.log.info("publisher_cleared", last_kept_chunk=msg.chunk_index, frames_dropped=dropped)


def run_publisher_service() -> None:
    run_attached_service("publisher", PublisherSettings, lambda proc, _: PublisherWorker(proc))
