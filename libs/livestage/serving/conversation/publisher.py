"""The `publisher` service: a session's frames and speech out to its viewers.

With `LIVESTAGE_LIVEKIT_URL` set it joins the session's LiveKit room as the avatar participant
(token minted from the API key/secret), publishes one audio and one video track in sync, and
speaks LiveKit's avatar data-stream protocol, so a LiveKit Agents voice agent can use the avatar as
its audio output: `lk.audio_stream` byte streams become the character's speech (`SpeakAudio`),
`lk.clear_buffer` interrupts the session, and `lk.playback_started` / `lk.playback_finished` are
reported back. Without a LiveKit URL it records the session to `<recordings_dir>/<session_id>.mp4`.

It takes the `FrameChunk`s the decoder publishes on `session.frames` (only shown chunks, in order)
and writes them to the sink from one writer task in the session's `SessionTasks`: a sink that
raises ends the session with a `publisher_failed` report instead of a silently dead writer. It
reports the playback position (`PlaybackReport` on `session.playback`) so generation stays a
bounded number of chunks ahead of what viewers see.

Interrupts are handled where they arrive. On `lk.clear_buffer` the publisher clears its own sink
at once, drops any further frames of the current epoch beyond what it had written, tells the
agent, and sends one `InterruptRequest` to the session; the session's own `Interrupt` that
follows (origin "publisher") then changes nothing here. An `Interrupt` from anywhere else raises
the epoch floor and clears what is queued beyond the last chunk kept. Either is applied once per
epoch, and a frame of a newer epoch applies it too (NATS does not order the control and frames
subjects against each other).
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
from livestage.observability import METRICS
from livestage.protos import stages_pb2 as spb
from livestage.serving.conversation.attached import AttachError, SessionAttachedWorker
from livestage.serving.process import ServiceProcess, SessionTasks, run_service
from livestage.transport import Envelope, build, Subjects, kind_of, tensor, to_numpy, wrap

MAX_DIMENSION = 4096
AGENT_CLEAR = "lk.clear_buffer"
INTERRUPT_REQUEST_TIMEOUT_S = 5.0


class PublisherSettings(Settings):
    recordings_dir: str = "recordings"
    """Where sessions are recorded as MP4 when no LiveKit URL is configured."""
    avatar_identity: str = "livestage-avatar"
    close_wait_s: float = Field(10.0, ge=0)
    """On detach, how long to wait for the last chunks still in flight before finalising."""


@dataclass
class PublishedSession:
    """One attached session: its sink, the frames queued for it, and what was written."""

    session_id: str
    sink: Any
    fps: int
    sample_rate: int
    worker: "PublisherWorker"
    tasks: SessionTasks
    epoch: int = 0
    """The epoch floor: frames of older epochs were generated before an interrupt."""
    last_written: int = -1
    cut: int | None = None
    """After `lk.clear_buffer`: frames of `epoch` beyond this chunk are dropped (until a newer
    epoch arrives, or the session could not be asked to roll back)."""
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    subs: list[Any] = field(default_factory=list)
    recording: str = ""
    bridge: Any = None
    room: Any = None
    external_reply: int = 1_000_000
    """Reply ids for speech from a LiveKit agent (kept apart from the dialogue's own ids)."""
    external_seq: int = 0
    speaking: bool = False
    written: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def log(self) -> Any:
        return self.worker.log

    def _stale(self, epoch: int, chunk_index: int) -> bool:
        if epoch != self.epoch:  # a newer epoch is never stale: the writer rolls back to it
            return epoch < self.epoch
        return chunk_index <= self.last_written or (self.cut is not None and chunk_index > self.cut)

    async def on_frames(self, env: Envelope, headers: dict[str, str], reply: str) -> None:
        from livestage.publishing import AVChunk

        if kind_of(env) != "frame_chunk":
            self.log.warning("frames_ignored", session_id=self.session_id, kind=kind_of(env))
            return
        if self._stale(env.epoch, env.chunk_index):
            return  # generated before an interrupt, or cleared by the LiveKit agent
        fc = env.frame_chunk
        try:
            if env.chunk_index < 0:
                raise ValueError(f"chunk_index: a frame chunk needs one, got {env.chunk_index}")
            chunk = AVChunk(chunk_index=env.chunk_index, frames=to_numpy(fc.frames, "frames"),
                            audio=np.asarray(to_numpy(fc.audio, "audio"), np.float32),
                            sample_rate=self.sample_rate, fps=self.fps, epoch=env.epoch)
            chunk.validate()
        except ValueError as exc:  # a malformed chunk is dropped; the session goes on
            METRICS.errors.labels(kind="publisher_frames").inc()
            self.log.warning("frames_dropped", session_id=self.session_id, chunk=env.chunk_index,
                             error=str(exc))
            return
        self.queue.put_nowait((chunk, fc.speaking))

    async def write_loop(self) -> None:
        """The session's one writer: chunks to the sink in arrival order. Anything the sink
        raises ends the session (SessionTasks reports it)."""
        while True:
            chunk, speaking = await self.queue.get()
            if chunk.epoch > self.epoch:  # the control message may still be on its way
                await self.rollback(chunk.epoch, chunk.chunk_index - 1,
                                    clear_sink=self.last_written >= chunk.chunk_index)
            if self._stale(chunk.epoch, chunk.chunk_index):
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

    async def rollback(self, epoch: int, last_kept: int, *, clear_sink: bool) -> int:
        """The session is at `epoch` and keeps chunks up to `last_kept`. Applied once per epoch
        (a repeat, or the control message after a newer frame, changes nothing); returns the
        frames the sink dropped."""
        if epoch <= self.epoch:
            return 0
        self.epoch = epoch
        self.cut = None
        self.last_written = min(self.last_written, last_kept)
        dropped = await self.sink.clear(last_kept) if clear_sink else 0
        self.log.info("publisher_cleared", session_id=self.session_id, epoch=epoch,
                      last_kept_chunk=last_kept, frames_dropped=dropped)
        return dropped

    async def report_played(self, chunk_index: int, position_s: float) -> None:
        """The sink started playing `chunk_index`: tell the session runtime (lookahead)."""
        await self.worker.bus.publish(Subjects.session_playback(self.session_id), wrap(
            spb.PlaybackReport(position_s=position_s), self.session_id, chunk_index, self.epoch))

    async def wait_written(self, last_chunk: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.last_written < last_chunk and loop.time() < deadline:
            self.written.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.written.wait(), max(deadline - loop.time(), 0.01))

    async def release(self) -> None:
        """Stops following the session: subscriptions, tasks, sink, room (each step runs even
        if an earlier one failed)."""
        for sub in self.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self.subs.clear()
        await self.tasks.close()
        if self.sink is not None:
            try:
                await self.sink.close()
            except Exception:
                self.log.exception("sink_close_failed", session_id=self.session_id)
        if self.room is not None:
            with contextlib.suppress(Exception):
                await self.room.disconnect()

    # -- LiveKit agent side (avatar data-stream protocol) ---------------------------------
    async def agent_audio(self, samples: np.ndarray, sample_rate: int) -> None:
        audio = np.asarray(resample_audio(samples, sample_rate, self.sample_rate), np.float32)
        self.external_seq += 1
        body = build(spb.SpeakAudio, reply=self.external_reply, seq=self.external_seq, sample_rate=self.sample_rate,
                     audio=tensor(audio))
        await self.worker.bus.publish(Subjects.session_speak_audio(self.session_id), wrap(body, self.session_id))

    async def agent_segment_end(self) -> None:
        self.external_reply += 1
        self.external_seq = 0

    async def agent_clear(self) -> None:
        """`lk.clear_buffer`: stop showing the agent's speech now, here, then ask the session to
        roll back once (its `Interrupt` that follows is then a no-op for this publisher)."""
        last = self.last_written
        self.cut = last
        await self.agent_segment_end()  # speech after the clear is a new reply, not a cancelled one
        dropped = await self.sink.clear(last)
        self.log.info("publisher_cleared", session_id=self.session_id, reason=AGENT_CLEAR,
                      last_shown_chunk=last, frames_dropped=dropped)
        if self.bridge is not None:
            with contextlib.suppress(Exception):
                await self.bridge.notify_playback_finished(self.sink.position_s, True)
        if self.tasks.running:
            self.tasks.spawn(self._request_interrupt(last, self.epoch), "interrupt_request")

    async def _request_interrupt(self, last_shown: int, epoch: int) -> None:
        request = wrap(spb.InterruptRequest(reason=AGENT_CLEAR, last_shown=last_shown),
                       self.session_id, epoch=epoch)
        try:
            answer = await self.worker.bus.request(Subjects.session_commands(self.session_id), request,
                                                   timeout=INTERRUPT_REQUEST_TIMEOUT_S)
        except TimeoutError as exc:  # NoRespondersError included
            error = repr(exc)
        else:
            if kind_of(answer) == "interrupt_done":
                self.log.info("session_interrupted", session_id=self.session_id,
                              last_kept_chunk=answer.interrupt_done.last_kept)
                return
            error = answer.stage_error.message if kind_of(answer) == "stage_error" else kind_of(answer)
        # The session did not roll back: its frames of this epoch stay valid, so stop dropping them
        # (the video would freeze otherwise).
        self.log.warning("interrupt_request_failed", session_id=self.session_id, error=error)
        if self.epoch == epoch:
            self.cut = None


class PublisherWorker(SessionAttachedWorker[PublishedSession]):
    stage = "publisher"
    attach_kind = "publisher"

    def __init__(self, proc: ServiceProcess):
        super().__init__(proc)
        self.settings: PublisherSettings = proc.settings  # type: ignore[assignment]

    @staticmethod
    def _check(name: str, value: int, low: int, high: int) -> int:
        if not low <= value <= high:
            raise AttachError(name, f"must be {low}..{high}, got {value}")
        return value

    def recording_sink(self, path: Path, realtime: bool) -> Any:
        """The sink a session without LiveKit records to: the one place it is made, so another
        recorder (or a test's) can be put in."""
        from livestage.publishing import Mp4RecorderSink

        return Mp4RecorderSink(path, realtime=realtime)

    async def _connect_output(self, session: PublishedSession, body: spb.PublisherAttach) -> None:
        from livestage.publishing import AvatarDataStreamBridge, LiveKitRoomLink, LiveKitSink, avatar_token

        s = self.settings
        if s.livekit_url:
            if not body.livekit_room:
                raise AttachError("livekit_room", "required when LiveKit is configured")
            session.room = LiveKitRoomLink()
            await session.room.connect(s.livekit_url, avatar_token(
                s.livekit_api_key, s.livekit_api_secret, body.livekit_room,
                identity=f"{s.avatar_identity}-{session.session_id}"))  # unique per session
            session.sink = LiveKitSink(session.room)
            session.bridge = AvatarDataStreamBridge(session.room, on_audio=session.agent_audio,
                                                    on_segment_end=session.agent_segment_end,
                                                    on_clear=session.agent_clear)
        else:
            path = Path(s.recordings_dir).resolve() / f"{session.session_id}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            session.sink = self.recording_sink(path, body.realtime)
            session.recording = str(path)

    async def open_session(self, session_id: str, body: spb.PublisherAttach,
                           tasks: SessionTasks) -> tuple[PublishedSession, spb.SessionAttached]:
        fps = self._check("fps", body.fps, 1, 120)
        width = self._check("width", body.width, 8, MAX_DIMENSION)
        height = self._check("height", body.height, 8, MAX_DIMENSION)
        rate = self._check("sample_rate", body.sample_rate, 8000, 48000)
        session = PublishedSession(session_id, None, fps, rate, self, tasks)
        try:
            await self._connect_output(session, body)
            session.sink.on_played = session.report_played
            await session.sink.start(width, height, fps, rate)
            session.subs = [await self.bus.subscribe(Subjects.session_frames(session_id), session.on_frames)]
            tasks.spawn(session.write_loop(), "writer")
        except BaseException:
            await session.release()  # a room joined or a recording started is let go
            raise
        return session, spb.SessionAttached(recording=session.recording)

    async def close_session(self, session: PublishedSession, last_chunk: int) -> spb.SessionDetached:
        if last_chunk >= 0:
            await session.wait_written(last_chunk, self.settings.close_wait_s)
        await session.release()
        return spb.SessionDetached(recording=session.recording, chunks=session.last_written + 1)

    async def on_interrupt(self, session: PublishedSession, env: Envelope, interrupt: spb.Interrupt) -> None:
        # An interrupt the publisher asked for was handled when the agent cleared its buffer: only
        # the epoch floor moves. Any other clears what is queued beyond the last chunk kept.
        await session.rollback(env.epoch, interrupt.last_kept, clear_sink=interrupt.origin != "publisher")


def run_publisher_service() -> None:
    run_service("publisher", PublisherSettings, lambda proc, shared: PublisherWorker(proc))
