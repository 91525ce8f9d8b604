"""The session service's side of the conversation: it attaches a dialogue worker and a publisher
worker to a session and turns their NATS traffic into runtime inputs and public events.

Flows (subjects in `livestage.transport.subjects`):
- user audio from `PushUserAudio` -> runtime (listen window) and `session.user_audio` -> dialogue;
- dialogue -> `session.dialogue`: transcripts, turn events, reply text -> `SessionEvent`s;
- TTS / A2A / a LiveKit agent -> `session.speak_audio` (16 kHz, tagged with its reply id) ->
  runtime (speak window); audio of a reply that was interrupted is dropped;
- publisher -> `session.playback` -> runtime lookahead; publisher -> `session.commands`
  (`lk.clear_buffer` from a LiveKit agent) -> interrupt;
- barge-in: the user starts talking while the character has speech pending -> interrupt, and
  `control` tells dialogue (cancel the reply) and publisher (clear its queues).

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
from livestage.runtime.session_runtime import SessionRuntime
from livestage.transport import NatsBus, NoRespondersError, StageMessage, Subjects

_log = get_logger("conversation")

TURN_KINDS = {"user_started": pb.TURN_KIND_USER_STARTED, "user_ended": pb.TURN_KIND_USER_ENDED,
              "reply_started": pb.TURN_KIND_REPLY_STARTED, "reply_finished": pb.TURN_KIND_REPLY_FINISHED,
              "barge_in": pb.TURN_KIND_BARGE_IN, "speech_started": pb.TURN_KIND_SPEECH_STARTED}
ATTACH_TIMEOUT_S = 15.0

class AttachFailed(RuntimeError):
    """A deployed dialogue/publisher worker refused or failed to take the session (e.g. the
    LiveKit room cannot be joined); the message says which and why."""


Emit = Callable[[pb.SessionEvent], Awaitable[None]]
Interrupt = Callable[[str], Awaitable[int]]


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
    async def _attach(self, stage: str, meta: dict[str, str]) -> StageMessage | None:
        try:
            reply = await self.bus.request(Subjects.stage_work(stage),
                                           StageMessage("open", self.session_id, meta=meta),
                                           timeout=ATTACH_TIMEOUT_S)
        except NoRespondersError:
            _log.info("stage_not_deployed", stage=stage, session_id=self.session_id)
            return None
        except TimeoutError:
            _log.warning("stage_attach_timeout", stage=stage, session_id=self.session_id)
            return None
        if reply.kind != "opened":
            raise AttachFailed(f"{stage}: {reply.meta.get('error', 'could not open the session')}")
        return reply

    async def open(self, dialogue_meta: dict[str, str], publisher_meta: dict[str, str]) -> None:
        """Subscribes to the session's conversation subjects, then attaches the workers."""
        sid = self.session_id
        self._subs = [
            await self.bus.subscribe(Subjects.session_dialogue(sid), self._on_dialogue),
            await self.bus.subscribe(Subjects.session_speak_audio(sid), self._on_speak_audio),
            await self.bus.subscribe(Subjects.session_playback(sid), self._on_playback),
            await self.bus.subscribe(Subjects.session_commands(sid), self._on_command),
        ]
        try:
            reply = await self._attach("dialogue", dialogue_meta)
            if reply is not None:
                self.dialogue_worker = reply.meta.get("worker_id", "")
            reply = await self._attach("publisher", publisher_meta)
            if reply is not None:
                self.publisher_worker = reply.meta.get("worker_id", "")
                self.recording = reply.meta.get("recording", "")
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
                await self.bus.request(Subjects.worker(stage, worker),
                                       StageMessage("close", self.session_id, last_chunk, epoch),
                                       timeout=30)
            except (TimeoutError, NoRespondersError) as exc:
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
            await self.bus.publish(Subjects.session_user_audio(self.session_id), StageMessage(
                "user_audio", self.session_id, meta={"sample_rate": str(self.sample_rate)},
                tensors={"audio": samples.astype(np.float32, copy=False)}))

    async def user_text(self, text: str) -> None:
        await self.bus.publish(Subjects.session_user_text(self.session_id),
                               StageMessage("user_text", self.session_id, meta={"text": text}))

    async def interrupted(self, last_kept: int, reason: str) -> None:
        """After the runtime rolled back: cancel the reply everywhere and clear the publisher."""
        self.cancelled_reply = max(self.cancelled_reply, self.current_reply)
        self._awaiting_speech = 0
        await self.bus.publish(Subjects.control(self.session_id), StageMessage(
            "control", self.session_id, last_kept, self.runtime.epoch,
            meta={"action": "interrupt", "reply": str(self.cancelled_reply), "reason": reason}))

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
    async def _turn(self, kind: str, reply: int = 0, detail: str = "") -> None:
        await self.emit(pb.SessionEvent(turn=pb.TurnEvent(
            kind=TURN_KINDS[kind], reply=reply, chunk_index=self.runtime.played, detail=detail)))

    async def _on_dialogue(self, msg: StageMessage, headers: dict, reply_to: str) -> None:
        meta = msg.meta
        reply = int(meta.get("reply", "0") or 0)
        if msg.kind == "transcript":
            await self.emit(pb.SessionEvent(transcript=pb.Transcript(
                text=meta.get("text", ""), final=meta.get("final") == "1",
                speaker=meta.get("speaker", "user"))))
        elif msg.kind == "turn":
            event = meta.get("event", "")
            if event == "user_started" and self.runtime.speech_pending:
                await self._turn("user_started", reply)
                await self.interrupt("barge_in")
                await self._turn("barge_in", self.cancelled_reply)
                return
            if event == "user_ended":
                self.user_ended_at = time.perf_counter()
            if event == "reply_started":
                self.current_reply = max(self.current_reply, reply)
            if event in TURN_KINDS:
                await self._turn(event, reply, meta.get("detail", ""))
        elif msg.kind == "reply_text":
            if reply <= self.cancelled_reply:
                return
            self.current_reply = max(self.current_reply, reply)
            await self.emit(pb.SessionEvent(reply_text=pb.ReplyText(
                reply=reply, delta=meta.get("delta", ""), done=meta.get("done") == "1")))
        elif msg.kind == "error":
            await self.emit(pb.SessionEvent(error=pb.ErrorEvent(
                code=meta.get("code", "dialogue"), message=meta.get("message", ""),
                field=meta.get("field", ""))))

    async def _on_speak_audio(self, msg: StageMessage, headers: dict, reply_to: str) -> None:
        reply = int(msg.meta.get("reply", "0") or 0)
        if reply and reply <= self.cancelled_reply:
            return  # speech of an interrupted reply, still in flight
        rate = int(msg.meta.get("sample_rate", "0") or 0)
        audio = msg.tensors.get("audio")
        if rate != self.sample_rate or audio is None or audio.ndim != 1:
            await self.emit(pb.SessionEvent(error=pb.ErrorEvent(
                code="speak_audio", field="sample_rate" if rate != self.sample_rate else "audio",
                message=f"speak audio must be mono float32 at {self.sample_rate} Hz "
                        f"(got {rate} Hz, shape {None if audio is None else tuple(audio.shape)})")))
            return
        if reply:
            self.current_reply = max(self.current_reply, reply)
            if reply not in self._speech_reply_seen and not self._awaiting_speech:
                self._awaiting_speech = reply
        self.runtime.push_speak_audio(np.nan_to_num(audio.astype(np.float32, copy=False)))

    async def _on_playback(self, msg: StageMessage, headers: dict, reply_to: str) -> None:
        if msg.epoch == self.runtime.epoch and msg.chunk_index >= 0:
            self.runtime.report_playback(msg.chunk_index)

    async def _on_command(self, msg: StageMessage, headers: dict, reply_to: str) -> None:
        if msg.meta.get("action") == "interrupt":
            last_kept = await self.interrupt(msg.meta.get("reason", "command"))
            if reply_to:
                await self.bus.respond(reply_to, StageMessage("interrupted", self.session_id, last_kept))
