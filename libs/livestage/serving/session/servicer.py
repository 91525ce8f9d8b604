"""The public `SessionService` (gRPC): validates requests and hands them to `LiveSession`s.

Bad input is answered with a gRPC status whose message names the field (`INVALID_ARGUMENT`,
`NOT_FOUND`, `FAILED_PRECONDITION`, `UNAVAILABLE`); one session's failure never touches another.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Awaitable, Callable, TypeVar

import grpc
import numpy as np

from pydantic import model_validator

from livestage.config import Settings, env_name
from livestage.media.errors import MediaError
from livestage.media.image import decode_image
from livestage.models.config import get_preset
from livestage.observability import METRICS, bind_session
from livestage.protos import session_pb2 as pb
from livestage.protos import session_pb2_grpc
from livestage.protos import stages_pb2 as spb
from livestage.runtime.session_state import SessionState
from livestage.runtime.stages import ReferenceKindError, check_reference_kinds
from livestage.security import AccessRefused, Authenticator, Caller, TenantDirectory
from livestage.serving.limits import MAX_DIRECTIVE_CHARS, MAX_PERSONA_CHARS, MAX_TEXT_CHARS, voice_problem
from livestage.serving.process import ServiceProcess, run_service
from livestage.serving.session.conversation import AttachFailed
from livestage.serving.session.events import STATE_TO_PB
from livestage.serving.session.live_session import LiveSession, SessionPlan
from livestage.serving.session.pipeline import StageUnavailable
from livestage.serving.stages.wire import KIND_BY_NAME
from livestage.state import SessionNotFound, SessionRecord, SessionStore
from livestage.transport import Subjects, kind_of, tensor, wrap

_KIND = {v: k for k, v in KIND_BY_NAME.items()}
MAX_LOOKAHEAD = 8
MAX_LIST = 1000
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ROOM = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_IDENTITY = re.compile(r"^[A-Za-z0-9_.@-]{1,128}$")
AVATAR_IDENTITY_PREFIX = "livestage-avatar"
T = TypeVar("T")


class SessionSettings(Settings):
    tenants_file: str = ""
    """YAML file of tenants and key digests (`livestage tenant add`); required, re-read on change."""

    @model_validator(mode="after")
    def _tenants_required(self) -> "SessionSettings":
        if not self.tenants_file:
            raise ValueError(f"{env_name('tenants_file')} is required: the session API serves "
                             f"only callers with an API key (create one with `livestage tenant add NAME`)")
        return self


def livekit_room(tenant: str, requested: str, session_id: str) -> str:
    """The tenant's namespaced room: `<tenant>_<requested>`, or one generated for the session.
    Tenant ids have no '_', so two tenants can never name the same room."""
    return f"{tenant}_{requested}" if requested else f"{tenant}_s-{session_id}"


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(field_name: str, problem: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{field_name}: {problem}")


def precondition(problem: str) -> RequestError:
    return RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"session_id: {problem}")


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    def __init__(self, proc: ServiceProcess):
        self.proc = proc
        self.settings: SessionSettings = proc.settings  # type: ignore[assignment]
        self.preset = get_preset(self.settings.preset)
        self.store = SessionStore(proc.redis, self.settings.session_ttl_s)
        self.live: dict[str, LiveSession] = {}
        self.log = proc.log
        self.auth = Authenticator(TenantDirectory(
            self.settings.tenants_file,
            on_reload_error=lambda why: self.log.error("tenants_file_rejected", error=why)))

    # -- ServiceWorker ----------------------------------------------------------------------
    stage = "session"

    async def start(self) -> None:
        from grpc_reflection.v1alpha import reflection

        session_pb2_grpc.add_SessionServiceServicer_to_server(self, self.proc.grpc_server)
        if self.settings.grpc_reflection:
            names = (pb.DESCRIPTOR.services_by_name["SessionService"].full_name, "grpc.health.v1.Health",
                     reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, self.proc.grpc_server)

    def sessions_held(self) -> None:
        return None  # the session API is placed by the load balancer, not by heartbeats

    async def drain(self) -> None:
        """SIGTERM: end every live session cleanly (their records stay in Redis)."""
        await asyncio.gather(*(s.end() for s in list(self.live.values()) if not s.ended),
                             return_exceptions=True)

    # -- helpers ----------------------------------------------------------------------------
    async def _guard(self, context: grpc.aio.ServicerContext, run: Callable[[Caller], Awaitable[T]]) -> T:
        """Authenticates the call, runs it for its caller, and turns refusals into statuses."""
        try:
            caller = self.auth.authenticate(context.invocation_metadata())
            return await run(caller)
        except AccessRefused as exc:
            METRICS.errors.labels(kind=exc.code).inc()
            code = (grpc.StatusCode.UNAUTHENTICATED if exc.code == "unauthenticated"
                    else grpc.StatusCode.RESOURCE_EXHAUSTED)
            await context.abort(code, exc.message)
        except RequestError as exc:
            METRICS.errors.labels(kind="request").inc()
            await context.abort(exc.code, exc.message)
        except SessionNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"session_id: {exc}")
        except StageUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        raise AssertionError("unreachable: context.abort raises")

    @staticmethod
    def _check_id(session_id: str) -> None:
        if not session_id:
            raise invalid("session_id", "required")
        if not _SESSION_ID.match(session_id):
            raise invalid("session_id", "malformed (letters, digits, '_' and '-', at most 64)")

    async def _record(self, session_id: str, caller: Caller) -> SessionRecord:
        """The caller's session record; another tenant's is reported as unknown (NOT_FOUND), so
        ids of other tenants' sessions cannot even be confirmed."""
        self._check_id(session_id)
        rec = await self.store.get(session_id)
        if rec.get("tenant", "") != caller.tenant_id:
            raise SessionNotFound(session_id)
        return rec

    async def _live(self, session_id: str, caller: Caller, *, running: bool = False) -> LiveSession:
        """The caller's live session; with `running`, one that has started and not ended.

        Ended sessions leave the table (their record says how they ended), so a call on one
        answers FAILED_PRECONDITION from the record."""
        self._check_id(session_id)
        live = self.live.get(session_id)
        if live is not None and live.ended:
            del self.live[session_id]
            if live.plan.tenant == caller.tenant_id:  # its record may not say so yet
                raise precondition("session has ended")
            live = None
        if live is None or live.plan.tenant != caller.tenant_id:
            rec = await self._record(session_id, caller)
            if rec.state == SessionState.ENDED.value:
                raise precondition("session has ended")
            raise SessionNotFound(session_id)  # a record this replica does not run
        if running and not live.started:
            raise precondition("session not started")
        return live

    def _to_proto(self, rec: SessionRecord) -> pb.Session:
        live = self.live.get(rec.id)
        state = live.state if live and not live.ended else SessionState(rec.get("state", "ended"))
        return pb.Session(
            session_id=rec.id, state=STATE_TO_PB[state], preset=rec.get("preset", ""),
            livekit_room=rec.get("livekit_room", ""),
            placement=pb.Placement(**{s: rec.get(f"placement:{s}", "") for s in
                                      ("encoder", "generator", "refiner", "decoder", "dialogue", "publisher")}),
            chunks_generated=int(rec.get("chunks_generated", 0) or 0),
            chunks_played=int(rec.get("chunks_played", 0) or 0),
            playback_seconds=float(rec.get("playback_seconds", 0) or 0),
            weights=rec.get("weights", ""), created_unix_ms=int(rec.get("created_ms", 0) or 0),
            sink_chunks=[int(x) for x in rec.get("sink_chunks", "").split(",") if x],
            sink_digest=rec.get("sink_digest", ""),
            recording=rec.get("recording", ""), livekit_url=self.settings.viewer_livekit_url,
        )

    async def _session(self, session_id: str) -> pb.Session:
        return self._to_proto(await self.store.get(session_id))

    # -- CreateSession ------------------------------------------------------------------------
    async def CreateSession(self, request: pb.CreateSessionRequest, context) -> pb.Session:
        return await self._guard(context, lambda caller: self._create(request, caller))

    def _reference_images(self, request: pb.CreateSessionRequest) -> list[spb.ReferenceImageTensor]:
        p = self.preset
        refs = request.character.references
        if not refs:
            raise invalid("character.references", "at least the global reference image is required")
        kinds = []
        for i, ref in enumerate(refs):
            if ref.kind not in _KIND:
                raise invalid(f"character.references[{i}].kind", "must be GLOBAL, VIEW or EXPRESSION")
            kinds.append(_KIND[ref.kind])
        try:
            check_reference_kinds(kinds)
        except ReferenceKindError as exc:
            where = "character.references" + (f"[{exc.index}].kind" if exc.index >= 0 else "")
            raise invalid(where, str(exc)) from None
        images = []
        for i, ref in enumerate(refs):
            name = f"character.references[{i}]"
            try:
                img = decode_image(ref.image, (p.height, p.width), name=f"{name}.image")
            except MediaError as exc:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            images.append(spb.ReferenceImageTensor(kind=ref.kind, image=tensor(img)))
        return images

    def _check_request(self, request: pb.CreateSessionRequest) -> int:
        """Everything but the images; returns the lookahead."""
        p, opts = self.preset, request.options
        if opts.preset and opts.preset != p.name:
            raise invalid("options.preset", f"this deployment serves preset {p.name!r}, not {opts.preset[:64]!r}")
        lookahead = opts.lookahead_chunks or self.settings.lookahead_chunks
        if not 1 <= lookahead <= MAX_LOOKAHEAD:
            raise invalid("options.lookahead_chunks", f"must be 1..{MAX_LOOKAHEAD}, got {lookahead}")
        if len(request.character.persona) > MAX_PERSONA_CHARS:
            raise invalid("character.persona", f"longer than {MAX_PERSONA_CHARS} characters")
        problem = voice_problem(request.character.voice)
        if problem is not None:
            raise invalid("character.voice", problem)
        if request.livekit_room and not _ROOM.match(request.livekit_room):
            raise invalid("livekit_room", "letters, digits, '_' and '-', at most 64 (empty: one is generated)")
        return lookahead

    async def _create(self, request: pb.CreateSessionRequest, caller: Caller) -> pb.Session:
        tenant = caller.tenant
        lookahead = self._check_request(request)
        images = await asyncio.to_thread(self._reference_images, request)  # decoding is CPU work
        session_id = uuid.uuid4().hex
        room = livekit_room(tenant.id, request.livekit_room, session_id)
        if not await self.store.claim_session_slot(tenant.id, session_id, tenant.max_sessions):
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"max_sessions: tenant {tenant.id!r} already has {tenant.max_sessions} live "
                               f"sessions; end one first")
        created = False
        try:
            if not await self.store.claim_room(room, session_id):
                raise RequestError(grpc.StatusCode.ALREADY_EXISTS,
                                   f"livekit_room: {request.livekit_room!r} is in use by a live session")
            with bind_session(session_id):
                live = await self._open(request, caller, session_id, room, lookahead, images)
                created = True
        finally:
            if not created:
                await self.store.release(tenant.id, session_id, room)
        self.log.info("session_created", session_id=session_id, tenant=tenant.id, key_id=caller.key_id,
                      placement=live.placement)
        return await self._session(session_id)

    async def _open(self, request: pb.CreateSessionRequest, caller: Caller, session_id: str, room: str,
                    lookahead: int, images: list[spb.ReferenceImageTensor]) -> LiveSession:
        p, opts, character = self.preset, request.options, request.character
        try:
            reply = await self.proc.bus.request(
                Subjects.stage_work("encoder"), wrap(spb.EncodeReferences(images=images), session_id),
                timeout=max(self.settings.stage_timeout_s, 30))
        except asyncio.TimeoutError:
            raise StageUnavailable("no encoder worker answered") from None
        if kind_of(reply) != "references_encoded":
            message = reply.stage_error.message if kind_of(reply) == "stage_error" else "failed"
            raise RequestError(grpc.StatusCode.INTERNAL, f"encoder: {message}")
        encoded = reply.references_encoded
        await self.store.create(session_id, {
            "state": SessionState.WARMUP.value, "preset": p.name, "livekit_room": room,
            "tenant": caller.tenant_id, "key_id": caller.key_id,
            "persona": character.persona, "voice": character.voice,
            "consent_reference": character.consent_reference,
            "seed": opts.seed, "weights": encoded.weights, "lookahead": lookahead})
        try:
            await self.store.save_references(session_id, encoded.references.SerializeToString())
            live = LiveSession(SessionPlan(session_id, int(opts.seed), lookahead, opts.realtime, character.persona,
                                           character.voice, room, tenant=caller.tenant_id,
                                           max_seconds=caller.tenant.max_session_seconds),
                               self.proc.bus, self.store, self.proc.registry, self.settings, p)
            await live.open()
        except (StageUnavailable, AttachFailed) as exc:
            await self.store.delete(session_id)
            if isinstance(exc, AttachFailed):
                raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
            raise
        for sid in [sid for sid, old in self.live.items() if old.ended]:
            del self.live[sid]
        self.live[session_id] = live
        conversation = live.conversation
        await self.store.update(session_id, **{
            "placement:dialogue": conversation.dialogue_worker,
            "placement:publisher": conversation.publisher_worker, "recording": conversation.recording})
        return live

    # -- the other RPCs -------------------------------------------------------------------------
    async def StartSession(self, request: pb.SessionRef, context) -> pb.Session:
        async def run(caller: Caller) -> pb.Session:
            live = await self._live(request.session_id, caller)
            await live.start()
            return await self._session(live.session_id)
        return await self._guard(context, run)

    async def _push_audio(self, request_iterator, speak: bool, context) -> pb.PushAudioSummary:
        async def run(caller: Caller) -> pb.PushAudioSummary:
            live: LiveSession | None = None
            total = 0
            rate = self.preset.chunk.sample_rate
            async for chunk in request_iterator:
                if live is None:
                    live = await self._live(chunk.session_id, caller)
                    if not live.started:
                        raise precondition("call StartSession before pushing audio")
                elif chunk.session_id and chunk.session_id != live.session_id:
                    raise invalid("session_id", "one stream carries one session")
                if live.ended:
                    raise precondition("session has ended")
                samples = self._pcm(chunk, rate)
                if not self.auth.limiter.take_audio(caller.tenant, samples.size / rate):
                    raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       f"pcm16: tenant {caller.tenant_id!r} is over its audio rate limit "
                                       f"({caller.tenant.audio_rate:g} s of audio per second)")
                if speak:
                    live.speak_audio(samples)
                else:
                    await live.user_audio(samples)
                total += samples.size
            if live is None:
                raise invalid("session_id", "empty audio stream")
            return pb.PushAudioSummary(session_id=live.session_id, samples_accepted=total,
                                       seconds_accepted=total / rate)
        return await self._guard(context, run)

    def _pcm(self, chunk: pb.AudioChunk, rate: int) -> np.ndarray:
        """One AudioChunk's samples as float32 mono, or a RequestError naming the bad field."""
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
        return samples.reshape(-1, 2).mean(axis=1) if channels == 2 else samples

    async def PushUserAudio(self, request_iterator, context) -> pb.PushAudioSummary:
        return await self._push_audio(request_iterator, speak=False, context=context)

    async def PushSpeakAudio(self, request_iterator, context) -> pb.PushAudioSummary:
        return await self._push_audio(request_iterator, speak=True, context=context)

    async def SendText(self, request: pb.SendTextRequest, context) -> pb.Session:
        async def run(caller: Caller) -> pb.Session:
            if not request.text.strip():
                raise invalid("text", "empty")
            if len(request.text) > MAX_TEXT_CHARS:
                raise invalid("text", f"longer than {MAX_TEXT_CHARS} characters")
            live = await self._live(request.session_id, caller, running=True)
            await live.user_text(request.text)
            return await self._session(live.session_id)
        return await self._guard(context, run)

    async def SetDirective(self, request: pb.SetDirectiveRequest, context) -> pb.Session:
        async def run(caller: Caller) -> pb.Session:
            if len(request.directive) > MAX_DIRECTIVE_CHARS:
                raise invalid("directive", f"longer than {MAX_DIRECTIVE_CHARS} characters")
            live = await self._live(request.session_id, caller)
            live.set_directive(request.directive)
            return await self._session(live.session_id)
        return await self._guard(context, run)

    async def Interrupt(self, request: pb.SessionRef, context) -> pb.InterruptResponse:
        async def run(caller: Caller) -> pb.InterruptResponse:
            live = await self._live(request.session_id, caller, running=True)
            last_kept = await live.interrupt("api")
            return pb.InterruptResponse(session_id=live.session_id, last_kept_chunk=last_kept)
        return await self._guard(context, run)

    async def EndSession(self, request: pb.SessionRef, context) -> pb.Session:
        """Ends the session; on one that has ended already it answers the ended session."""
        async def run(caller: Caller) -> pb.Session:
            try:
                live = await self._live(request.session_id, caller)
            except RequestError as exc:
                if exc.code != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                return self._to_proto(await self._record(request.session_id, caller))
            await live.end()
            return await self._session(live.session_id)
        return await self._guard(context, run)

    async def GetSession(self, request: pb.SessionRef, context) -> pb.Session:
        async def run(caller: Caller) -> pb.Session:
            return self._to_proto(await self._record(request.session_id, caller))
        return await self._guard(context, run)

    async def ListSessions(self, request: pb.ListSessionsRequest, context) -> pb.ListSessionsResponse:
        async def run(caller: Caller) -> pb.ListSessionsResponse:
            if request.limit > MAX_LIST:
                raise invalid("limit", f"at most {MAX_LIST}, got {request.limit}")
            records = await self.store.list(limit=request.limit or 100, tenant=caller.tenant_id)
            return pb.ListSessionsResponse(sessions=[self._to_proto(r) for r in records])
        return await self._guard(context, run)

    async def CreateViewerToken(self, request: pb.ViewerTokenRequest, context) -> pb.ViewerToken:
        async def run(caller: Caller) -> pb.ViewerToken:
            from livestage.publishing.tokens import viewer_token

            live = await self._live(request.session_id, caller)
            s = self.settings
            if not s.livekit_url:
                raise precondition("LiveKit is not configured (LIVESTAGE_LIVEKIT_URL); the session is "
                                   "recorded to an MP4 instead")
            room = live.plan.livekit_room
            if not request.identity.strip():
                raise invalid("identity", "required")
            if not _IDENTITY.match(request.identity) or request.identity.startswith(AVATAR_IDENTITY_PREFIX):
                raise invalid("identity", f"letters, digits, '_', '.', '@' and '-', at most 128, not "
                                          f"starting with {AVATAR_IDENTITY_PREFIX!r}")
            if len(request.name) > 128:
                raise invalid("name", "longer than 128 characters")
            ttl = request.ttl_s or 3600
            if not 60 <= ttl <= 86400:
                raise invalid("ttl_s", f"must be 60..86400 seconds, got {ttl}")
            token = viewer_token(s.livekit_api_key, s.livekit_api_secret, room, request.identity,
                                 name=request.name, ttl_s=ttl)
            return pb.ViewerToken(token=token, livekit_url=s.viewer_livekit_url, room=room,
                                  expires_unix=int(time.time()) + ttl)
        return await self._guard(context, run)

    async def StreamEvents(self, request: pb.SessionRef, context):
        async def find(caller: Caller) -> LiveSession | None:
            try:
                return await self._live(request.session_id, caller)
            except RequestError as exc:
                if exc.code == grpc.StatusCode.FAILED_PRECONDITION:
                    return None  # ended: the stream closes at once
                raise
        live = await self._guard(context, find)
        if live is None:
            return
        async for event in live.events():
            yield event


def run_session_service() -> None:
    run_service("session", SessionSettings, lambda proc, _: SessionServicer(proc))
