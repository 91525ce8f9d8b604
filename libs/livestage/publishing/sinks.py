"""Where a session's media goes: a LiveKit room (audio + video tracks in sync) or an MP4 file.

Both take whole chunks (`write`), report what has played (`position_s`, `chunks_played`, the
`on_played` hook the publisher turns into playback reports for the lookahead), and on an
interrupt drop what they still hold beyond the last chunk kept (`clear`).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Awaitable, Callable, Protocol

from livestage.media.mp4 import Mp4Writer
from livestage.publishing.av_frames import AVChunk, FrameAudioAligner, to_rtc_frames
from livestage.publishing.room import RoomLink

OnPlayed = Callable[[int, float], Awaitable[None]]


class MediaSink(Protocol):
    on_played: OnPlayed | None

    async def start(self, width: int, height: int, fps: int, sample_rate: int) -> None: ...
    async def write(self, chunk: AVChunk) -> None: ...
    async def clear(self, after_chunk: int) -> int: ...
    async def close(self) -> None: ...
    @property
    def position_s(self) -> float: ...
    @property
    def chunks_played(self) -> int: ...


class Mp4RecorderSink:
    """Records the session: video track and audio track cut frame by frame from the same
    aligner, so the two stay within a frame of each other however chunks arrive. With
    `realtime=True`, chunk k is written no earlier than k seconds after the first one (the
    position then moves like a viewer's)."""

    def __init__(self, path: str | Path, realtime: bool = False):
        self.path = Path(path)
        self.realtime = realtime
        self.on_played: OnPlayed | None = None
        self._writer: Mp4Writer | None = None
        self._aligner: FrameAudioAligner | None = None
        self._played = 0
        self._frames = 0
        self._fps = 1
        self._t0: float | None = None

    async def start(self, width: int, height: int, fps: int, sample_rate: int) -> None:
        self._fps = fps
        self._writer = Mp4Writer(self.path, fps=fps, width=width, height=height, audio_rate=sample_rate)
        self._aligner = FrameAudioAligner(sample_rate, fps)

    async def write(self, chunk: AVChunk) -> None:
        assert self._writer is not None and self._aligner is not None, "start() first"
        pairs = self._aligner.split(chunk)
        if self.realtime:
            now = time.perf_counter()
            self._t0 = self._t0 if self._t0 is not None else now
            due = self._t0 + self._frames / self._fps
            if due > now:
                await asyncio.sleep(due - now)
        import numpy as np

        self._writer.write_frames(np.stack([f for f, _ in pairs]))
        self._writer.write_audio(np.concatenate([a for _, a in pairs]))
        self._frames += len(pairs)
        self._played = chunk.chunk_index + 1
        if self.on_played is not None:
            await self.on_played(chunk.chunk_index, self.position_s)

    async def clear(self, after_chunk: int) -> int:
        return 0  # nothing is queued: a chunk is written when it arrives

    async def close(self) -> None:
        if self._writer is not None:
            await asyncio.to_thread(self._writer.close)
            self._writer = None

    @property
    def position_s(self) -> float:
        return self._frames / self._fps

    @property
    def chunks_played(self) -> int:
        return self._played

    @property
    def drift_samples(self) -> int:
        return self._aligner.drift_samples if self._aligner else 0


MAX_QUEUED_CHUNKS = 16
"""Chunks waiting for the rtc SDK: beyond this `write` waits (the session's publisher slows down,
nothing grows without bound)."""


class LiveKitSink:
    """Publishes `avatar_audio` (microphone) and `avatar_video` (camera) through the rtc SDK's
    `AVSynchronizer`, which paces video at the fps and lets the audio source's queue provide
    back-pressure. Tracks are published on the first chunk (no black frames before it). Frames
    are queued per chunk so an interrupt can drop the ones not yet pushed, and
    `AudioSource.clear_queue()` drops the audio already handed to the SDK."""

    def __init__(self, room: RoomLink, audio_queue_ms: int = 200):
        self.room = room
        self.audio_queue_ms = audio_queue_ms
        self.on_played: OnPlayed | None = None
        self._queue: asyncio.Queue[AVChunk] = asyncio.Queue(maxsize=MAX_QUEUED_CHUNKS)
        self._pump: asyncio.Task | None = None
        self._published = False
        self._frames_pushed = 0
        self._played = 0
        self._fps = 1
        self.max_drift_ms = 0.0

    async def start(self, width: int, height: int, fps: int, sample_rate: int) -> None:
        from livekit import rtc

        self._fps = fps
        self._rate = sample_rate
        self.audio_source = rtc.AudioSource(sample_rate, 1, queue_size_ms=self.audio_queue_ms)
        self.video_source = rtc.VideoSource(width, height)
        self.sync = rtc.AVSynchronizer(audio_source=self.audio_source, video_source=self.video_source,
                                       video_fps=fps)
        self._aligner = FrameAudioAligner(sample_rate, fps)
        self._pump = asyncio.create_task(self._run())

    async def _publish_tracks(self) -> None:
        from livekit import rtc

        audio = rtc.LocalAudioTrack.create_audio_track("avatar_audio", self.audio_source)
        video = rtc.LocalVideoTrack.create_video_track("avatar_video", self.video_source)
        await self.room.publish_track(audio, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
        await self.room.publish_track(video, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA))
        self._published = True

    async def _run(self) -> None:
        while True:
            chunk = await self._queue.get()
            if not self._published:
                await self._publish_tracks()
            for frame, audio in self._aligner.split(chunk):
                video, sound = to_rtc_frames(frame, audio, self._rate)
                await self.sync.push(video)
                await self.sync.push(sound)
                self._frames_pushed += 1
                drift = abs(self.sync.last_video_time - self.sync.last_audio_time) * 1000 \
                    if hasattr(self.sync, "last_video_time") else 0.0
                self.max_drift_ms = max(self.max_drift_ms, drift)
            self._played = chunk.chunk_index + 1
            if self.on_played is not None:
                await self.on_played(chunk.chunk_index, self.position_s)

    async def write(self, chunk: AVChunk) -> None:
        """Queues a chunk for the pump; raises once the pump has died (the publisher's writer,
        and with it the session's task group, then ends the session with a clear reason)."""
        chunk.validate()
        while True:
            if self._pump is not None and self._pump.done():
                failure = None if self._pump.cancelled() else self._pump.exception()
                raise RuntimeError(f"LiveKit publishing stopped: {failure!r}")
            if not self._queue.full():
                break
            await asyncio.sleep(0.02)  # back-pressure: LiveKit takes the frames slower than we make them
        self._queue.put_nowait(chunk)

    async def clear(self, after_chunk: int) -> int:
        dropped = 0
        kept: list[AVChunk] = []
        while not self._queue.empty():
            c = self._queue.get_nowait()
            if c.chunk_index > after_chunk:
                dropped += c.frames.shape[0]
                self._aligner.skip(c.frames.shape[0])
            else:
                kept.append(c)
        for c in kept:
            self._queue.put_nowait(c)
        self.audio_source.clear_queue()
        return dropped

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            try:
                await self._pump
            except (asyncio.CancelledError, Exception):
                pass
        await self.sync.aclose()
        await self.audio_source.aclose()

    @property
    def position_s(self) -> float:
        return self._frames_pushed / self._fps

    @property
    def chunks_played(self) -> int:
        return self._played
