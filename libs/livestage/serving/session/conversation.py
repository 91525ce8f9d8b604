"""The session service's side of the conversation: it attaches a dialogue worker and a publisher
worker to a session and turns their NATS traffic into runtime inputs and public events.

Flows (subjects in `livestage.transport.subjects`, bodies in `protos/livestage/v1/stages.proto`):
- user audio from `PushUserAudio` -> runtime (listen window) and `session.user_audio`
  (`UserAudio`) -> dialogue; `SendText` -> `session.user_text` (`UserText`);
- dialogue and any worker -> `session.reports`: `Transcript`, `TurnEvent`, `ReplyText` and
  `worker_error` (`ErrorEvent`) -> `SessionEvent`s;
- TTS / A2A / a LiveKit agent -> `session.speak_audio` (`SpeakAudio`, 16 kHz, tagged with its
  reply id) -> runtime (speak window); audio of a reply that was interrupted is dropped;
- publisher -> `session.playback` (`PlaybackReport`) -> runtime lookahead; publisher ->
  `session.commands` (`InterruptRequest`, a LiveKit agent's `lk.clear_buffer`) -> interrupt,
  answered `InterruptDone`;
- barge-in: the user starts talking while the character has speech pending -> interrupt, and
  `control` (`Interrupt`, with the session's new epoch) tells dialogue (cancel the reply) and
  publisher (clear its queues).

Dialogue and publisher are optional: without their workers a session still runs on
`PushSpeakAudio` and the frames subject, as before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import numpy as np

from livestage.observability import METRICS, get_logger
from livestage.protos import session_pb2 as pb
from livestage.protos import stages_pb2 as spb
from livestage.runtime.session_runtime import SessionRuntime
from livestage.transport import (Envelope, NatsBus, NoRespondersError, Subjects, build, error_envelope, kind_of, tensor,
                                 to_numpy, wrap)

_log = get_logger("conversation")

ATTACH_TIMEOUT_S = 15.0
DETACH_TIMEOUT_S = 30.0


class AttachFailed(RuntimeError):
    """A deployed dialogue/publisher worker refused or failed to take the session (e.g. the
    LiveKit room cannot be joined); the message says which and why."""


Emit = Callable[[pb.SessionEvent], Awaitable[None]]
Interrupt = Callable[[str, str], Awaitable[int]]
"""`interrupt(reason, origin)`: the session rolls back and calls `interrupted`; `origin` is who
asked ("publisher" when it already cleared its own queue, and treats the echo as a no-op)."""


@dataclass
class ConversationLink:
    """Per-session wiring between the runtime and the dialogue/publisher workers."""

    session_id: str
    bus: NatsBus
    runtime: SessionRuntime
    emit: Emit
    interrupt: Interrupt
    sample_rate: int = 16000
    dialogue_worker: str = ""
    publisher_worker: str = ""
    recording: str = ""
    current_reply: int = 0
    cancelled_reply: int = 0
    user_ended_at: float | None = None
    first_speech_latency_s: list[float] = field(default_factory=list)
    _speech_reply_seen: set[int] = field(default_factory=set)
    _subs: list[Any] = field(default_factory=list)
    _awaiting_speech: int = 0

    # -- attach / detach -------------------------------------------------------------------
    async def _attach(self, stage: str, attach: spb.AttachSession) -> spb.SessionAttached | None:
        """The worker's answer; None when the stage is not deployed (or did not answer)."""
        try:
            reply = await self.bus.request(Subjects.stage_work(stage), wrap(attach, self.session_id),
                                           timeout=ATTACH_TIMEOUT_S)
        except NoRespondersError:
            _log.info("stage_not_deployed", stage=stage, session_id=self.session_id)
            return None
        except TimeoutError:
            _log.warning("stage_attach_timeout", stage=stage, session_id=self.session_id)
            return None
        if kind_of(reply) == "stage_error":
            raise AttachFailed(f"{stage}: {reply.stage_error.message or 'could not attach the session'}")
        if kind_of(reply) != "session_attached":
            raise AttachFailed(f"{stage}: answered {kind_of(reply)!r} to attach_session")
        return reply.session_attached

    async def open(self, dialogue: spb.DialogueAttach, publisher: spb.PublisherAttach) -> None:
        """Subscribes to the session's conversation subjects, then attaches the workers."""
        sid = self.session_id
        self._subs = [
            await self.bus.subscribe(Subjects.session_reports(sid), self._on_report),
            await self.bus.subscribe(Subjects.session_speak_audio(sid), self._on_speak_audio),
            await self.bus.subscribe(Subjects.session_playback(sid), self._on_playback),
            await self.bus.subscribe(Subjects.session_commands(sid), self._on_command),
        ]
        try:
            attached = await self._attach("dialogue", build(spb.AttachSession, dialogue=dialogue))
            if attached is not None:
                self.dialogue_worker = attached.worker_id
            attached = await self._attach("publisher", build(spb.AttachSession, publisher=publisher))
            if attached is not None:
                self.publisher_worker = attached.worker_id
                self.recording = attached.recording
        except AttachFailed:
            await self.close()  # a dialogue worker that did attach lets go again
            raise

    async def close(self, last_chunk: int = -1, epoch: int = 0) -> None:
        """Ends the session on both workers; waits for the publisher to finish its recording
        (up to `last_chunk`, the last chunk the runtime delivered)."""
        for stage, worker in (("dialogue", self.dialogue_worker), ("publisher", self.publisher_worker)):
            if not worker:
                continue
            try:
                await self.bus.request(Subjects.worker(stage, worker), wrap(
                    spb.DetachSession(last_chunk=last_chunk), self.session_id, epoch=epoch),
                    timeout=DETACH_TIMEOUT_S)
            except TimeoutError as exc:  # NoRespondersError included
                _log.warning("stage_close_failed", stage=stage, worker=worker, error=repr(exc))
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # connection already closed
                pass
        self._subs.clear()

    # -- inputs from the public API --------------------------------------------------------
    async def user_audio(self, samples: np.ndarray) -> None:
        if self.dialogue_worker:
            body = build(spb.UserAudio, sample_rate=self.sample_rate, audio=tensor(np.asarray(samples, np.float32)))
            await self.bus.publish(Subjects.session_user_audio(self.session_id), wrap(body, self.session_id))

    async def user_text(self, text: str) -> None:
        await self.bus.publish(Subjects.session_user_text(self.session_id),
                               wrap(spb.UserText(text=text), self.session_id))

    async def interrupted(self, last_kept: int, reason: str, origin: str = "session") -> None:
        """After the runtime rolled back: cancel the reply everywhere and clear the publisher."""
        self.cancelled_reply = max(self.cancelled_reply, self.current_reply)
        self._awaiting_speech = 0
        body = spb.Interrupt(last_kept=last_kept, reply=self.cancelled_reply, reason=reason, origin=origin)
        await self.bus.publish(Subjects.control(self.session_id),
                               wrap(body, self.session_id, last_kept, self.runtime.epoch))

    def on_chunk(self, chunk_index: int, speaking: bool) -> tuple[bool, float | None]:
        """Called per delivered chunk: (is this the first chunk of a reply's speech, the
        end-of-user-speech -> first answer frame latency in seconds when the reply followed
        spoken input)."""
        if not speaking or not self._awaiting_speech or self._awaiting_speech in self._speech_reply_seen:
            return False, None
        reply = self._awaiting_speech
        self._speech_reply_seen.add(reply)
        self._awaiting_speech = 0
        ended, self.user_ended_at = self.user_ended_at, None
        if ended is None:
            return True, None
        latency = time.perf_counter() - ended
        self.first_speech_latency_s.append(latency)
        METRICS.reply_latency.observe(latency)
        return True, latency

    # -- handlers --------------------------------------------------------------------------
    async def _turn(self, kind: int, reply: int = 0, detail: str = "") -> None:
        await self.emit(pb.SessionEvent(turn=pb.TurnEvent(
            kind=kind, reply=reply, chunk_index=self.runtime.played, detail=detail)))

    async def _on_report(self, env: Envelope, headers: dict[str, str], reply_to: str) -> None:
        kind = kind_of(env)
        if kind == "transcript":
            await self.emit(pb.SessionEvent(transcript=env.transcript))
        elif kind == "turn":
            await self._on_turn(env.turn)
        elif kind == "reply_text":
            text = env.reply_text
            if text.reply <= self.cancelled_reply:
                return
            self.current_reply = max(self.current_reply, text.reply)
            await self.emit(pb.SessionEvent(reply_text=text))
        elif kind == "worker_error":
            await self.emit(pb.SessionEvent(error=env.worker_error))
        else:
            _log.warning("report_ignored", session_id=self.session_id, kind=kind)

    async def _on_turn(self, turn: pb.TurnEvent) -> None:
        if turn.kind == pb.TURN_KIND_USER_STARTED and self.runtime.speech_pending:
            await self._turn(pb.TURN_KIND_USER_STARTED, turn.reply)
            await self.interrupt("barge_in", "dialogue")
            await self._turn(pb.TURN_KIND_BARGE_IN, self.cancelled_reply)
            return
        if turn.kind == pb.TURN_KIND_USER_ENDED:
            self.user_ended_at = time.perf_counter()
        if turn.kind == pb.TURN_KIND_REPLY_STARTED:
            self.current_reply = max(self.current_reply, turn.reply)
        if turn.kind != pb.TURN_KIND_UNSPECIFIED:
            await self._turn(turn.kind, turn.reply, turn.detail)

    async def _speak_error(self, field: str, message: str) -> None:
        await self.emit(pb.SessionEvent(error=pb.ErrorEvent(code="speak_audio", field=field, message=message)))

    async def _on_speak_audio(self, env: Envelope, headers: dict[str, str], reply_to: str) -> None:
        if kind_of(env) != "speak_audio":
            await self._speak_error("body", f"body: expected speak_audio, got {kind_of(env)!r}")
            return
        body = env.speak_audio
        if body.reply and body.reply <= self.cancelled_reply:
            return  # speech of an interrupted reply, still in flight
        expected = f"speak audio must be mono float32 at {self.sample_rate} Hz"
        if body.sample_rate != self.sample_rate:
            await self._speak_error("sample_rate", f"{expected} (got {body.sample_rate} Hz)")
            return
        try:
            audio = to_numpy(body.audio, "audio")
        except ValueError as exc:
            await self._speak_error("audio", f"{expected} ({exc})")
            return
        if audio.ndim != 1 or audio.dtype != np.float32:
            await self._speak_error("audio", f"{expected} (got {audio.dtype}, shape {tuple(audio.shape)})")
            return
        if body.reply:
            self.current_reply = max(self.current_reply, body.reply)
            if body.reply not in self._speech_reply_seen and not self._awaiting_speech:
                self._awaiting_speech = body.reply
        self.runtime.push_speak_audio(np.nan_to_num(audio))

    async def _on_playback(self, env: Envelope, headers: dict[str, str], reply_to: str) -> None:
        if kind_of(env) == "playback_report" and env.epoch == self.runtime.epoch and env.chunk_index >= 0:
            self.runtime.report_playback(env.chunk_index)

    async def _on_command(self, env: Envelope, headers: dict[str, str], reply_to: str) -> None:
        if kind_of(env) != "interrupt_request":
            await self.bus.respond(reply_to, error_envelope(
                f"body: the session takes interrupt_request, got {kind_of(env)!r}", "body", like=env))
            return
        last_kept = await self.interrupt(env.interrupt_request.reason or "command", "publisher")
        await self.bus.respond(reply_to, wrap(spb.InterruptDone(last_kept=last_kept), self.session_id,
                                              last_kept, self.runtime.epoch))
