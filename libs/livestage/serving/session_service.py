"""The public `SessionService` (gRPC) and the per-session runtimes it owns.

Bad input is answered with a gRPC status whose message names the field (`INVALID_ARGUMENT`,
`NOT_FOUND`, `FAILED_PRECONDITION`, `UNAVAILABLE`); one session's failure never touches another.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import grpc
import numpy as np

from livestage.config import Settings
from livestage.media.errors import MediaError
from livestage.media.image import decode_image
from livestage.models.config import MAX_REFERENCES, get_preset
from livestage.observability import METRICS, bind_session
from livestage.protos import session_pb2 as pb
from livestage.protos import session_pb2_grpc
from livestage.runtime.session_runtime import ChunkDelivery, SessionRuntime
from livestage.runtime.session_state import SessionState
from livestage.serving.conversation import AttachFailed, ConversationLink
from livestage.serving.distributed_pipeline import DistributedChunkPipeline, StageUnavailable
from livestage.serving.process import ServiceProcess
from livestage.state import CheckpointStore, SessionNotFound, SessionStore, WorkerRegistry
from livestage.transport import StageMessage, Subjects

_KIND = {pb.REFERENCE_KIND_GLOBAL: "global", pb.REFERENCE_KIND_VIEW: "view",
         pb.REFERENCE_KIND_EXPRESSION: "expression"}
_STATE = {SessionState.WARMUP: pb.SESSION_STATE_WARMUP, SessionState.IDLE: pb.SESSION_STATE_IDLE,
          SessionState.LISTENING: pb.SESSION_STATE_LISTENING,
          SessionState.RESPONDING: pb.SESSION_STATE_RESPONDING, SessionState.ENDED: pb.SESSION_STATE_ENDED}
MAX_LOOKAHEAD = 8


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(field_name: str, problem: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{field_name}: {problem}")


@dataclass
class LiveSession:
    session_id: str
    runtime: SessionRuntime
    pipeline: DistributedChunkPipeline
    task: asyncio.Task | None = None
    subscribers: list[asyncio.Queue] = field(default_factory=list)
    started: bool = False
    ended: bool = False
    weights: str = ""
    started_at: float | None = None
    frames_delivered: int = 0
    conversation: ConversationLink | None = None


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    def __init__(self, proc: ServiceProcess):
        self.proc = proc
        self.settings: Settings = proc.settings
        self.preset = get_preset(self.settings.preset)
        self.store = SessionStore(proc.redis, self.settings.session_ttl_s)
        self.registry = WorkerRegistry(proc.redis, self.settings.heartbeat_ttl_s)
        self.checkpoints = CheckpointStore(proc.redis, self.settings.session_ttl_s)
        self.live: dict[str, LiveSession] = {}
        self.log = proc.log

    # -- helpers ----------------------------------------------------------------------------
    async def _guard(self, context: grpc.aio.ServicerContext, coro):
        try:
            return await coro
        except RequestError as exc:
            METRICS.errors.labels(kind="request").inc()
            await context.abort(exc.code, exc.message)
        except SessionNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"session_id: {exc}")
        except StageUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    def _live(self, session_id: str) -> LiveSession:
        if not session_id:
            raise invalid("session_id", "required")
        live = self.live.get(session_id)
        if live is None:
            raise SessionNotFound(session_id)
        return live

    async def _to_proto(self, session_id: str) -> pb.Session:
        rec = await self.store.get(session_id)
        live = self.live.get(session_id)
        state = live.runtime.current_state if live else SessionState(rec.get("state", "ended"))
        return pb.Session(
            session_id=session_id, state=_STATE[state], preset=rec.get("preset", ""),
            livekit_room=rec.get("livekit_room", ""),
            placement=pb.Placement(generator=rec.get("placement:generator", ""),
                                   refiner=rec.get("placement:refiner", ""),
                                   decoder=rec.get("placement:decoder", ""),
                                   dialogue=rec.get("placement:dialogue", ""),
                                   publisher=rec.get("placement:publisher", "")),
            chunks_generated=int(rec.get("chunks_generated", 0) or 0),
            chunks_played=int(rec.get("chunks_played", 0) or 0),
            playback_seconds=float(rec.get("playback_seconds", 0) or 0),
            weights=rec.get("weights", ""), created_unix_ms=int(rec.get("created_ms", 0) or 0),
            sink_chunks=[int(x) for x in rec.get("sink_chunks", "").split(",") if x],
            sink_digest=rec.get("sink_digest", ""),
            recording=rec.get("recording", ""), livekit_url=self.settings.viewer_livekit_url,
        )

    async def _emit(self, live: LiveSession, event: pb.SessionEvent) -> None:
        event.session_id = live.session_id
        event.unix_ms = int(time.time() * 1000)
        for q in list(live.subscribers):
            q.put_nowait(event)

    def _events_for(self, live: LiveSession):
        async def sink(kind: str, payload: dict) -> None:
            if kind == "state":
                await self._emit(live, pb.SessionEvent(state_changed=pb.StateChanged(
                    previous=_STATE[SessionState(payload["from"])],
                    current=_STATE[SessionState(payload["to"])], chunk_index=payload["chunk"])))
                try:
                    await self.store.update(live.session_id, state=payload["to"])
                except SessionNotFound:
                    pass
            elif kind == "chunk":
                await self._emit(live, pb.SessionEvent(chunk_ready=pb.ChunkReady(
                    chunk_index=payload["chunk"], frames=payload["frames"], shape=payload["shape"],
                    frames_subject=Subjects.session_frames(live.session_id))))
                timings = payload["timings_ms"]
                await self._emit(live, pb.SessionEvent(chunk_timing=pb.ChunkTiming(
                    chunk_index=payload["chunk"],
                    stage_ms={k: v for k, v in timings.items() if k != "end_to_end"},
                    end_to_end_ms=timings.get("end_to_end", 0.0))))
            elif kind == "failover":
                await self._emit(live, pb.SessionEvent(error=pb.ErrorEvent(
                    code="failover", message=f"re-placed {','.join(payload['dead_stages']) or 'stalled stages'} "
                                             f"after chunk {payload['last_kept_chunk']}")))
        return sink

    def _on_chunk_for(self, live: LiveSession):
        async def on_chunk(d: ChunkDelivery) -> None:
            meta = {"speaking": str(int(d.speaking)), "user_speaking": str(int(d.user_speaking)),
                    "state": live.runtime.current_state.value}
            meta.update({f"w.{k}": v for k, v in d.worker_ids.items()})
            await self.proc.bus.publish(Subjects.session_frames(live.session_id), StageMessage(
                "frames", live.session_id, d.chunk_index, d.epoch, meta,
                {"frames": d.frames, "audio": d.speak_audio}))
            if live.conversation is not None:
                first, latency = live.conversation.on_chunk(d.chunk_index, d.speaking)
                if first:
                    detail = "" if latency is None else f"{latency * 1000:.0f} ms after end of user speech"
                    await self._emit(live, pb.SessionEvent(turn=pb.TurnEvent(
                        kind=pb.TURN_KIND_SPEECH_STARTED, reply=live.conversation.current_reply,
                        chunk_index=d.chunk_index, detail=detail)))
            e2e = d.timings_ms.get("end_to_end")
            if e2e is not None:
                METRICS.chunk_e2e_latency.observe(e2e / 1000)
            METRICS.lookahead_chunks.labels(session_id=live.session_id).set(
                live.runtime.next_submit - live.runtime.played)
            now = time.perf_counter()
            if live.frames_delivered == 0 and live.started_at is not None:
                METRICS.time_to_first_chunk.observe(now - live.started_at)
            live.frames_delivered += int(d.frames.shape[0])
            elapsed = now - (live.started_at or now)
            if elapsed > 0:
                METRICS.fps_delivered.labels(session_id=live.session_id).set(live.frames_delivered / elapsed)
            try:
                await self.store.update(live.session_id, chunks_played=d.chunk_index + 1,
                                        playback_seconds=(d.chunk_index + 1) * self.preset.chunk.chunk_seconds)
            except SessionNotFound:
                pass
        return on_chunk

    # -- RPCs -------------------------------------------------------------------------------
    async def CreateSession(self, request: pb.CreateSessionRequest, context) -> pb.Session:
        return await self._guard(context, self._create(request))

    async def _create(self, request: pb.CreateSessionRequest) -> pb.Session:
        p = self.preset
        opts = request.options
        if opts.preset and opts.preset != p.name:
            raise invalid("options.preset", f"this deployment serves preset {p.name!r}, not {opts.preset!r}")
        lookahead = opts.lookahead_chunks or self.settings.lookahead_chunks
        if not 1 <= lookahead <= MAX_LOOKAHEAD:
            raise invalid("options.lookahead_chunks", f"must be 1..{MAX_LOOKAHEAD}, got {lookahead}")
        refs = request.character.references
        if not refs:
            raise invalid("character.references", "at least the global reference image is required")
        counts: dict[str, int] = {}
        images = []
        for i, ref in enumerate(refs):
            name = f"character.references[{i}]"
            kind = _KIND.get(ref.kind)
            if kind is None:
                raise invalid(f"{name}.kind", "must be GLOBAL, VIEW or EXPRESSION")
            counts[kind] = counts.get(kind, 0) + 1
            if counts[kind] > MAX_REFERENCES[kind]:
                raise invalid(f"{name}.kind", f"at most {MAX_REFERENCES[kind]} {kind} image(s)")
            try:
                img = decode_image(ref.image, (p.height, p.width), name=f"{name}.image")
            except MediaError as exc:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            images.append((kind, img))
        if counts.get("global") != 1:
            raise invalid("character.references", "exactly one GLOBAL reference image is required")
        session_id = uuid.uuid4().hex
        with bind_session(session_id):
            tensors = {f"image{i}": img.numpy() for i, (_, img) in enumerate(images)}
            try:
                reply = await self.proc.bus.request(
                    Subjects.stage_work("encoder"),
                    StageMessage("references", session_id, meta={"kinds": ",".join(k for k, _ in images)},
                                 tensors=tensors), timeout=max(self.settings.stage_timeout_s, 30))
            except asyncio.TimeoutError:
                raise StageUnavailable("no encoder worker answered") from None
            if reply.kind != "references":
                raise RequestError(grpc.StatusCode.INTERNAL, f"encoder: {reply.meta.get('error', 'failed')}")
            weights = reply.meta.get("weights", "")
            await self.store.create(session_id, {
                "state": SessionState.WARMUP.value, "preset": p.name, "livekit_room": request.livekit_room,
                "persona": request.character.persona, "voice": request.character.voice,
                "consent_reference": request.character.consent_reference,
                "seed": opts.seed, "weights": weights, "lookahead": lookahead})
            await self.store.save_references(session_id, reply.tensors["encoded"].tobytes())
            pipeline = DistributedChunkPipeline(session_id, self.proc.bus, self.store, self.registry,
                                                self.settings, int(opts.seed), lookahead,
                                                p.chunk.samples_per_chunk)
            try:
                await pipeline.open()
            except StageUnavailable:
                await self.store.delete(session_id)
                raise
            live = LiveSession(session_id, None, pipeline, weights=weights)  # type: ignore[arg-type]
            live.runtime = SessionRuntime(session_id, p.chunk, pipeline, lookahead=lookahead,
                                          realtime=opts.realtime, events=self._events_for(live),
                                          on_chunk=self._on_chunk_for(live))
            try:
                live.conversation = await self._converse(live, request, lookahead)
            except AttachFailed as exc:
                await pipeline.close()
                await self.store.delete(session_id)
                raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
            self.live[session_id] = live
            self.log.info("session_created", session_id=session_id, placement=pipeline.placement,
                          dialogue=live.conversation.dialogue_worker,
                          publisher=live.conversation.publisher_worker)
            return await self._to_proto(session_id)

    async def _converse(self, live: LiveSession, request: pb.CreateSessionRequest,
                        lookahead: int) -> ConversationLink:
        """Attaches the dialogue and publisher workers (when deployed) to a new session."""
        p = self.preset
        link = ConversationLink(live.session_id, self.proc.bus, live.runtime, self._emitter(live),
                                lambda reason: self._interrupt(live, reason),
                                sample_rate=p.chunk.sample_rate)
        await link.open(
            dialogue_meta={"persona": request.character.persona, "voice": request.character.voice,
                           "sample_rate": str(p.chunk.sample_rate)},
            publisher_meta={"livekit_room": request.livekit_room, "fps": str(p.chunk.fps),
                            "width": str(p.width), "height": str(p.height),
                            "sample_rate": str(p.chunk.sample_rate),
                            "realtime": str(int(request.options.realtime)),
                            "lookahead": str(lookahead)})
        await self.store.update(live.session_id, **{
            "placement:dialogue": link.dialogue_worker, "placement:publisher": link.publisher_worker,
            "recording": link.recording})
        return link

    def _emitter(self, live: LiveSession):
        async def emit(event: pb.SessionEvent) -> None:
            await self._emit(live, event)
        return emit

    async def _interrupt(self, live: LiveSession, reason: str) -> int:
        """Rolls the session back to the chunk playing now and cancels the reply everywhere."""
        last_kept = await live.runtime.interrupt()
        tr = live.runtime.state.on_interrupt(last_kept)
        if tr is not None:
            await self._events_for(live)("state", {"from": tr.previous.value, "to": tr.current.value,
                                                   "chunk": tr.chunk_index})
        if live.conversation is not None:
            await live.conversation.interrupted(last_kept, reason)
        return last_kept

    async def StartSession(self, request: pb.SessionRef, context) -> pb.Session:
        async def run() -> pb.Session:
            live = self._live(request.session_id)
            if live.ended:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, "session_id: session has ended")
            if not live.started:
                live.started = True
                live.started_at = time.perf_counter()
                live.task = asyncio.create_task(self._run_session(live))
            return await self._to_proto(live.session_id)
        return await self._guard(context, run())

    async def _run_session(self, live: LiveSession) -> None:
        try:
            with bind_session(live.session_id):
                await live.runtime.run()
        except Exception as exc:
            self.log.exception("session_failed", session_id=live.session_id)
            await self._emit(live, pb.SessionEvent(error=pb.ErrorEvent(code="session_failed", message=str(exc))))
        finally:
            live.ended = True
            for q in live.subscribers:
                q.put_nowait(None)

    async def _push_audio(self, request_iterator, speak: bool, context) -> pb.PushAudioSummary:
        async def run() -> pb.PushAudioSummary:
            live = None
            total = 0
            rate = self.preset.chunk.sample_rate
            async for chunk in request_iterator:
                if live is None:
                    live = self._live(chunk.session_id)
                    if not live.started:
                        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                           "session_id: call StartSession before pushing audio")
                    if live.ended:
                        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, "session_id: session has ended")
                elif chunk.session_id and chunk.session_id != live.session_id:
                    raise invalid("session_id", "one stream carries one session")
                if chunk.sample_rate != rate:
                    raise invalid("sample_rate", f"must be {rate} Hz, got {chunk.sample_rate}")
                channels = chunk.channels or 1
                if channels not in (1, 2):
                    raise invalid("channels", f"must be 1 or 2, got {chunk.channels}")
                if len(chunk.pcm16) > self.settings.max_audio_message_bytes:
                    raise invalid("pcm16", f"{len(chunk.pcm16)} bytes in one message, more than "
                                           f"{self.settings.max_audio_message_bytes}")
                if len(chunk.pcm16) % (2 * channels):
                    raise invalid("pcm16", f"{len(chunk.pcm16)} bytes is not a whole number of "
                                           f"{channels}-channel 16-bit samples")
                samples = np.frombuffer(chunk.pcm16, dtype="<i2").astype(np.float32) / 32768.0
                if channels == 2:
                    samples = samples.reshape(-1, 2).mean(axis=1)
                if speak:
                    live.runtime.push_speak_audio(samples)
                else:
                    live.runtime.push_listen_audio(samples)
                    if live.conversation is not None:
                        await live.conversation.user_audio(samples)
                total += samples.size
            if live is None:
                raise invalid("session_id", "empty audio stream")
            return pb.PushAudioSummary(session_id=live.session_id, samples_accepted=total,
                                       seconds_accepted=total / rate)
        return await self._guard(context, run())

    async def PushUserAudio(self, request_iterator, context) -> pb.PushAudioSummary:
        return await self._push_audio(request_iterator, speak=False, context=context)

    async def PushSpeakAudio(self, request_iterator, context) -> pb.PushAudioSummary:
        return await self._push_audio(request_iterator, speak=True, context=context)

    async def SendText(self, request: pb.SendTextRequest, context) -> pb.Session:
        async def run() -> pb.Session:
            live = self._live(request.session_id)
            if not request.text.strip():
                raise invalid("text", "empty")
            await self._emit(live, pb.SessionEvent(transcript=pb.Transcript(text=request.text, final=True,
                                                                            speaker="user")))
            if len(request.text) > 4000:
                raise invalid("text", "longer than 4000 characters")
            if live.conversation is not None:
                await live.conversation.user_text(request.text)
            return await self._to_proto(live.session_id)
        return await self._guard(context, run())

    async def SetDirective(self, request: pb.SetDirectiveRequest, context) -> pb.Session:
        async def run() -> pb.Session:
            live = self._live(request.session_id)
            if len(request.directive) > 1000:
                raise invalid("directive", "longer than 1000 characters")
            live.runtime.set_directive(request.directive)
            return await self._to_proto(live.session_id)
        return await self._guard(context, run())

    async def Interrupt(self, request: pb.SessionRef, context) -> pb.InterruptResponse:
        async def run() -> pb.InterruptResponse:
            live = self._live(request.session_id)
            if not live.started:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, "session_id: session not started")
            last_kept = await self._interrupt(live, "api")
            return pb.InterruptResponse(session_id=live.session_id, last_kept_chunk=last_kept)
        return await self._guard(context, run())

    async def EndSession(self, request: pb.SessionRef, context) -> pb.Session:
        async def run() -> pb.Session:
            live = self._live(request.session_id)
            await self._end(live)
            return await self._to_proto(live.session_id)
        return await self._guard(context, run())

    async def _end(self, live: LiveSession) -> None:
        live.runtime.stop()
        if live.task is not None:
            try:
                await asyncio.wait_for(live.task, 30)
            except asyncio.TimeoutError:
                live.task.cancel()
        else:
            await live.runtime._emit_transition(live.runtime.state.end(live.runtime.played))
        live.ended = True
        if live.conversation is not None:
            await live.conversation.close(last_chunk=live.runtime.played - 1, epoch=live.runtime.epoch)
        await live.pipeline.close()
        await self.store.update(live.session_id, state=SessionState.ENDED.value)
        for q in live.subscribers:
            q.put_nowait(None)

    async def GetSession(self, request: pb.SessionRef, context) -> pb.Session:
        async def run() -> pb.Session:
            if not request.session_id:
                raise invalid("session_id", "required")
            return await self._to_proto(request.session_id)
        return await self._guard(context, run())

    async def ListSessions(self, request: pb.ListSessionsRequest, context) -> pb.ListSessionsResponse:
        async def run() -> pb.ListSessionsResponse:
            records = await self.store.list(limit=request.limit or 100)
            return pb.ListSessionsResponse(sessions=[await self._to_proto(r["id"]) for r in records])
        return await self._guard(context, run())

    async def CreateViewerToken(self, request: pb.ViewerTokenRequest, context) -> pb.ViewerToken:
        async def run() -> pb.ViewerToken:
            from livestage.publishing.tokens import viewer_token

            live = self._live(request.session_id)
            s = self.settings
            if not s.livekit_url:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   "session_id: LiveKit is not configured (LIVESTAGE_LIVEKIT_URL); "
                                   "the session is recorded to an MP4 instead")
            rec = await self.store.get(live.session_id)
            room = rec.get("livekit_room", "")
            if not room:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   "session_id: the session was created without a livekit_room")
            if not request.identity.strip():
                raise invalid("identity", "required")
            ttl = request.ttl_s or 3600
            if not 60 <= ttl <= 86400:
                raise invalid("ttl_s", f"must be 60..86400 seconds, got {ttl}")
            token = viewer_token(s.livekit_api_key, s.livekit_api_secret, room, request.identity,
                                 name=request.name, ttl_s=ttl)
            return pb.ViewerToken(token=token, livekit_url=s.viewer_livekit_url, room=room,
                                  expires_unix=int(time.time()) + ttl)
        return await self._guard(context, run())

    async def StreamEvents(self, request: pb.SessionRef, context):
        try:
            live = self._live(request.session_id)
        except (RequestError, SessionNotFound) as exc:
            code = exc.code if isinstance(exc, RequestError) else grpc.StatusCode.NOT_FOUND
            await context.abort(code, exc.message if isinstance(exc, RequestError) else f"session_id: {exc}")
            return
        q: asyncio.Queue = asyncio.Queue()
        live.subscribers.append(q)
        try:
            while True:
                event = await q.get()
                if event is None:
                    return
                yield event
        finally:
            live.subscribers.remove(q)

    async def drain(self) -> None:
        """SIGTERM: end every live session cleanly (their records stay in Redis)."""
        await asyncio.gather(*(self._end(s) for s in list(self.live.values()) if not s.ended),
                             return_exceptions=True)


def run_session_service() -> None:
    from grpc_reflection.v1alpha import reflection

    from livestage.config import load_settings

    settings = load_settings(Settings, service="session")

    async def main() -> None:
        proc = ServiceProcess(settings, "session")
        holder: dict[str, SessionServicer] = {}

        async def setup() -> None:
            servicer = SessionServicer(proc)
            holder["s"] = servicer
            session_pb2_grpc.add_SessionServiceServicer_to_server(servicer, proc.grpc_server)
            names = (pb.DESCRIPTOR.services_by_name["SessionService"].full_name,
                     "grpc.health.v1.Health", reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, proc.grpc_server)

        async def drain() -> None:
            if "s" in holder:
                await holder["s"].drain()

        await proc.run(setup, drain)

    asyncio.run(main())
