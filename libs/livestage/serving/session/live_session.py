"""`LiveSession`: everything the session service runs for one live session, behind a small interface.

It owns the session's runtime (chunk clock, lookahead, states), its distributed chunk pipeline, the
link to its dialogue and publisher workers, the fan-out of its public events, and its tasks (one
`SessionTasks` group: if the runtime loop dies the session ends with a `session_failed` event).
The gRPC servicer validates requests and calls these methods; it never touches the runtime.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np

from livestage.config import Settings
from livestage.models.config import ModelPreset
from livestage.observability import METRICS, bind_session, get_logger
from livestage.protos import session_pb2 as pb
from livestage.protos import stages_pb2 as spb
from livestage.runtime.session_runtime import ChunkDelivery, SessionRuntime
from livestage.runtime.session_state import SessionState
from livestage.serving.process import SessionTasks
from livestage.serving.session.conversation import ConversationLink
from livestage.serving.session.events import STATE_TO_PB
from livestage.serving.session.pipeline import DistributedChunkPipeline
from livestage.state import SessionNotFound, SessionStore, WorkerRegistry
from livestage.transport import NatsBus, Subjects

_log = get_logger("session")
END_TIMEOUT_S = 30.0
EVENT_QUEUE_SIZE = 1024
"""Events held for one `StreamEvents` reader that is slower than the session."""


@dataclass(frozen=True)
class SessionPlan:
    """What a new session is made of (validated by the servicer)."""

    session_id: str
    seed: int
    lookahead: int
    realtime: bool
    persona: str
    voice: str
    livekit_room: str
    """The LiveKit room, already namespaced by tenant and claimed for this session."""
    tenant: str = ""
    max_seconds: float = 0.0
    """The tenant's `max_session_seconds`: the session ends by itself after this long (0: never)."""


class LiveSession:
    def __init__(self, plan: SessionPlan, bus: NatsBus, store: SessionStore, registry: WorkerRegistry,
                 settings: Settings, preset: ModelPreset):
        self.session_id = plan.session_id
        self.plan = plan
        self.store = store
        self.preset = preset
        self.pipeline = DistributedChunkPipeline(plan.session_id, bus, registry, settings, plan.seed,
                                                 plan.lookahead)
        self.runtime = SessionRuntime(plan.session_id, preset.chunk, self.pipeline, lookahead=plan.lookahead,
                                      realtime=plan.realtime, events=self._on_runtime_event,
                                      on_chunk=self._on_chunk)
        self.conversation = ConversationLink(plan.session_id, bus, self.runtime, self.emit,
                                             self.interrupt,
                                             sample_rate=preset.chunk.sample_rate)
        self._subscribers: list[asyncio.Queue] = []
        self._tasks: SessionTasks | None = None
        self._run: asyncio.Task | None = None
        self.started = False
        self.ended = False
        self._started_at: float | None = None
        self._frames_delivered = 0
        self._start_timeout_s = settings.start_timeout_s
        self._expiry: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    async def open(self) -> None:
        """Places the stages and attaches the conversation workers; undoes both on failure."""
        await self.pipeline.open()
        try:
            p, plan = self.preset, self.plan
            await self.conversation.open(
                spb.DialogueAttach(persona=plan.persona, voice=plan.voice, sample_rate=p.chunk.sample_rate),
                spb.PublisherAttach(livekit_room=plan.livekit_room, fps=p.chunk.fps, width=p.width,
                                    height=p.height, sample_rate=p.chunk.sample_rate, realtime=plan.realtime,
                                    lookahead=plan.lookahead))
        except BaseException:
            await self.pipeline.close()
            raise
        self._expiry = asyncio.create_task(self._expire(), name=f"{self.session_id}:expiry")

    async def _expire(self) -> None:
        """A session nobody starts must not hold its workers' slots for ever, and none outlives
        its tenant's `max_session_seconds` (counted from creation)."""
        opened = time.monotonic()
        limit = self.plan.max_seconds or float("inf")
        await asyncio.sleep(min(self._start_timeout_s, limit))
        if self.ended:
            return
        if not self.started:
            code, message = "start_timeout", f"not started within {self._start_timeout_s:g} s: ended"
        else:
            await asyncio.sleep(max(limit - (time.monotonic() - opened), 0.0))
            if self.ended:
                return
            code, message = "max_duration", f"the tenant's sessions last at most {limit:g} s: ended"
        _log.info("session_expired", session_id=self.session_id, code=code)
        await self.emit(pb.SessionEvent(error=pb.ErrorEvent(code=code, message=message)))
        self._expiry = None  # end() must not cancel the task it runs in
        await self.end()

    @property
    def placement(self) -> dict[str, str]:
        return {**self.pipeline.placement, "dialogue": self.conversation.dialogue_worker,
                "publisher": self.conversation.publisher_worker}

    @property
    def state(self) -> SessionState:
        return self.runtime.current_state

    async def start(self) -> None:
        if self.started:
            return
        self.started = True
        self._started_at = time.perf_counter()
        self._tasks = await SessionTasks.start(self.session_id, self._failed)
        self._run = self._tasks.spawn(self._run_runtime(), "runtime")

    async def _run_runtime(self) -> None:
        with bind_session(self.session_id):
            await self.runtime.run()
        self._close_streams()

    async def _failed(self, exc: BaseException) -> None:
        _log.error("session_failed", session_id=self.session_id, error=repr(exc))
        await self.emit(pb.SessionEvent(error=pb.ErrorEvent(code="session_failed", message=str(exc))))
        self.ended = True
        self._close_streams()

    async def end(self) -> None:
        """Stops the chunk clock, lets the publisher finish, releases every worker."""
        if self.ended and self._run is None:
            return
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self.runtime.stop()
        if self._run is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._run), END_TIMEOUT_S)
            except (asyncio.TimeoutError, Exception):
                pass
        else:
            await self.runtime.end_unstarted()
        if self._tasks is not None:
            await self._tasks.close()
        self._run = None
        self.ended = True
        await self.conversation.close(last_chunk=self.runtime.played - 1, epoch=self.runtime.epoch)
        await self.pipeline.close()
        try:
            await self.store.update(self.session_id, state=SessionState.ENDED.value)
        except SessionNotFound:
            pass
        if self.plan.tenant:
            try:
                await self.store.release(self.plan.tenant, self.session_id, self.plan.livekit_room)
            except Exception as exc:  # Redis away: the claims lapse with the record
                _log.warning("release_failed", session_id=self.session_id, error=repr(exc))
        METRICS.forget_session(self.session_id)
        self._close_streams()

    # -- inputs ------------------------------------------------------------------------------------
    async def user_audio(self, samples: np.ndarray) -> None:
        self.runtime.push_listen_audio(samples)
        await self.conversation.user_audio(samples)

    def speak_audio(self, samples: np.ndarray) -> None:
        self.runtime.push_speak_audio(samples)

    async def user_text(self, text: str) -> None:
        await self.emit(pb.SessionEvent(transcript=pb.Transcript(text=text, final=True, speaker="user")))
        await self.conversation.user_text(text)

    def set_directive(self, text: str) -> None:
        self.runtime.set_directive(text)

    async def interrupt(self, reason: str, origin: str = "api") -> int:
        """Rolls the session back to the chunk playing now and cancels the reply everywhere."""
        last_kept = await self.runtime.interrupt()
        await self.conversation.interrupted(last_kept, reason, origin)
        return last_kept

    # -- events ------------------------------------------------------------------------------------
    async def emit(self, event: pb.SessionEvent) -> None:
        event.session_id = self.session_id
        event.unix_ms = int(time.time() * 1000)
        for q in list(self._subscribers):
            if q.full():  # a reader that stopped reading: drop its oldest event, never block the session
                q.get_nowait()
                METRICS.errors.labels(kind="event_dropped").inc()
            q.put_nowait(event)

    def _close_streams(self) -> None:
        for q in self._subscribers:
            if q.full():
                q.get_nowait()
            q.put_nowait(None)

    async def events(self) -> AsyncIterator[pb.SessionEvent]:
        """The session's events from now on, until it ends (at once for an ended session)."""
        if self.ended:
            return
        q: asyncio.Queue = asyncio.Queue(maxsize=EVENT_QUEUE_SIZE)
        self._subscribers.append(q)
        try:
            while True:
                event = await q.get()
                if event is None:
                    return
                yield event
        finally:
            self._subscribers.remove(q)

    async def _on_runtime_event(self, kind: str, payload: dict) -> None:
        if kind == "state":
            await self.emit(pb.SessionEvent(state_changed=pb.StateChanged(
                previous=STATE_TO_PB[SessionState(payload["from"])],
                current=STATE_TO_PB[SessionState(payload["to"])], chunk_index=payload["chunk"])))
            try:
                await self.store.update(self.session_id, state=payload["to"])
            except SessionNotFound:
                pass
        elif kind == "chunk":
            await self.emit(pb.SessionEvent(chunk_ready=pb.ChunkReady(
                chunk_index=payload["chunk"], frames=payload["frames"], shape=payload["shape"],
                frames_subject=Subjects.session_frames(self.session_id))))
            timings = payload["timings_ms"]
            await self.emit(pb.SessionEvent(chunk_timing=pb.ChunkTiming(
                chunk_index=payload["chunk"], stage_ms={k: v for k, v in timings.items() if k != "end_to_end"},
                end_to_end_ms=timings.get("end_to_end", 0.0))))
        elif kind == "failover":
            stages = ",".join(payload["dead_stages"]) or "stalled stages"
            await self.emit(pb.SessionEvent(error=pb.ErrorEvent(
                code="failover", message=f"re-placed {stages} after chunk {payload['last_kept_chunk']}")))

    async def _on_chunk(self, d: ChunkDelivery) -> None:
        first, latency = self.conversation.on_chunk(d.chunk_index, d.speaking)
        if first:
            detail = "" if latency is None else f"{latency * 1000:.0f} ms after end of user speech"
            await self.emit(pb.SessionEvent(turn=pb.TurnEvent(
                kind=pb.TURN_KIND_SPEECH_STARTED, reply=self.conversation.current_reply,
                chunk_index=d.chunk_index, detail=detail)))
        e2e = d.timings_ms.get("end_to_end")
        if e2e is not None:
            METRICS.chunk_e2e_latency.observe(e2e / 1000)
        METRICS.lookahead_chunks.labels(session_id=self.session_id).set(self.runtime.next_submit - self.runtime.played)
        now = time.perf_counter()
        if self._frames_delivered == 0 and self._started_at is not None:
            METRICS.time_to_first_chunk.observe(now - self._started_at)
        self._frames_delivered += int(d.shape[0]) if d.shape else 0
        elapsed = now - (self._started_at or now)
        if elapsed > 0:
            METRICS.fps_delivered.labels(session_id=self.session_id).set(self._frames_delivered / elapsed)
        try:
            await self.store.update(self.session_id, chunks_played=d.chunk_index + 1,
                                    playback_seconds=(d.chunk_index + 1) * self.preset.chunk.chunk_seconds)
        except SessionNotFound:
            pass
