"""The `dialogue` service: listens to the user, decides when a turn ends, and answers.

Backends (`LIVESTAGE_DIALOGUE_BACKEND`):
- `builtin`: voice activity + end of turn (silero VAD), streaming speech recognition (Whisper
  tiny.en through faster-whisper), a reply from a small local language model (Gemma-3-270M GGUF
  through llama.cpp), spoken by the `tts` service sentence by sentence;
- `openai`: the same, but the reply streams from an OpenAI-compatible chat endpoint
  (`LIVESTAGE_LLM_BASE_URL`: vLLM, llama.cpp server, a hosted API);
- `a2a`: an external audio-to-audio system does everything; this service only forwards the
  user's audio to it and its speech back to the session.

What goes out on `session.reports` (typed bodies of the session API): `Transcript` (partial and
final, speaker user/character), `TurnEvent` (user started/ended, reply started/finished),
`ReplyText` deltas and `worker_error` (`ErrorEvent`); speech goes to `session.speak_audio` as
`SpeakAudio` (through `tts`, or from the A2A system). A new user utterance, an interrupt
(`control`) or the session's end cancels the reply being written or spoken.

Every task of a session (listening, partial and final recognition, the reply and its speech, the
A2A relay) runs in the session's `SessionTasks`: a reply cancelled on purpose is normal, anything
else that dies takes the session down with a `dialogue_failed` report instead of going quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field

from livestage.config import Settings
from livestage.media.audio import resample_audio
from livestage.protos import session_pb2 as pb
from livestage.protos import stages_pb2 as spb
from livestage.serving.conversation.attached import AttachError, SessionAttachedWorker
from livestage.serving.limits import MAX_PERSONA_CHARS, MAX_TEXT_CHARS, voice_problem
from livestage.serving.process import ServiceProcess, SessionTasks, run_service
from livestage.transport import Envelope, Subjects, build, kind_of, tensor, to_numpy, wrap

MAX_BACKLOG_S = 20.0
MAX_PARTIAL_S = 15.0


class DialogueSettings(Settings):
    dialogue_backend: Literal["builtin", "openai", "a2a"] = "builtin"
    asr_model_dir: str = ""
    """A faster-whisper model directory replacing the packaged Whisper tiny.en."""
    llm_model_path: str = ""
    """A GGUF file replacing the packaged Gemma-3-270M."""
    llm_base_url: str = ""
    llm_api_key: str = ""
    llm_model: str = ""
    a2a_url: str = ""
    """WebSocket URL of the external audio-to-audio system (backend `a2a`)."""
    reply_max_tokens: int = Field(60, gt=0)
    vad_end_silence_ms: int = Field(600, gt=0)
    """Silence after speech that ends the user's turn."""
    max_utterance_s: float = Field(30.0, gt=0)
    partial_every_s: float = Field(1.0, gt=0)
    tts_timeout_s: float = Field(30.0, gt=0)
    history_turns: int = Field(8, gt=0)
    """Turns of conversation kept for the language model (older ones are dropped)."""


@dataclass
class DialogueModels:
    """What every session of a worker shares (loaded once)."""

    settings: DialogueSettings
    recognizer: Any = None
    reply_model: Any = None

    @classmethod
    def load(cls, settings: DialogueSettings) -> "DialogueModels":
        from livestage.speech import LocalGGUFReplyModel, OpenAIChatReplyModel, WhisperRecognizer

        models = cls(settings)
        if settings.dialogue_backend == "a2a":
            if not settings.a2a_url:
                raise ValueError("LIVESTAGE_A2A_URL is required with LIVESTAGE_DIALOGUE_BACKEND=a2a")
            return models
        models.recognizer = WhisperRecognizer(model_dir=settings.asr_model_dir or None,
                                              threads=max(settings.torch_threads, 1))
        if settings.dialogue_backend == "openai":
            if not settings.llm_base_url:
                raise ValueError("LIVESTAGE_LLM_BASE_URL is required with LIVESTAGE_DIALOGUE_BACKEND=openai")
            models.reply_model = OpenAIChatReplyModel(settings.llm_base_url, api_key=settings.llm_api_key,
                                                      model=settings.llm_model)
        else:
            models.reply_model = LocalGGUFReplyModel(model_path=settings.llm_model_path or None,
                                                     n_threads=max(settings.torch_threads, 1),
                                                     max_tokens=settings.reply_max_tokens)
        return models


@dataclass
class DialogueSession:
    """One attached session: its audio queue, turn detector, conversation history and reply."""

    session_id: str
    persona: str
    voice: str
    sample_rate: int
    worker: "DialogueWorker"
    tasks: SessionTasks
    history: list[Any] = field(default_factory=list)
    reply_id: int = 0
    reply_task: asyncio.Task | None = None
    audio_queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    subs: list[Any] = field(default_factory=list)
    turns: Any = None
    a2a: Any = None
    in_speech: bool = False
    utterance: list = field(default_factory=list)
    utterance_samples: int = 0
    partial_due: int = 0
    partial_task: asyncio.Task | None = None
    backlog_samples: int = 0
    dropped_samples: int = 0
    closing: bool = False

    # -- outputs (the session's reports subject) ---------------------------------------------
    async def report(self, body: Any) -> None:
        await self.worker.bus.publish(Subjects.session_reports(self.session_id), wrap(body, self.session_id))

    async def turn(self, kind: int, reply: int, detail: str = "") -> None:
        await self.report(pb.TurnEvent(kind=kind, reply=reply, detail=detail))

    async def transcript(self, text: str, final: bool, speaker: str) -> None:
        await self.report(pb.Transcript(text=text, final=final, speaker=speaker))

    async def error(self, code: str, message: str, field: str = "") -> None:
        await self.report(pb.ErrorEvent(code=code, message=message, field=field))

    # -- user input --------------------------------------------------------------------------
    async def on_user_audio(self, env: Envelope, headers: dict[str, str], reply: str) -> None:
        if kind_of(env) != "user_audio":
            await self.error("user_audio", f"body: expected user_audio, got {kind_of(env)!r}", "body")
            return
        body = env.user_audio
        if body.sample_rate != self.sample_rate:
            await self.error("user_audio", f"user audio must be mono at {self.sample_rate} Hz, got "
                                           f"{body.sample_rate} Hz", "sample_rate")
            return
        try:
            audio = to_numpy(body.audio, "audio")
        except ValueError as exc:
            await self.error("user_audio", str(exc), "audio")
            return
        if audio.ndim != 1 or audio.dtype != np.float32:
            await self.error("user_audio", f"audio: user audio must be mono float32 samples, got "
                                           f"{audio.dtype} {list(audio.shape)}", "audio")
            return
        if self.backlog_samples > MAX_BACKLOG_S * self.sample_rate:
            # A microphone delivers in real time; audio arriving much faster than the dialogue can
            # listen (a file pushed at once, 30 min in a burst) is dropped, not queued forever.
            if not self.dropped_samples:
                await self.error("user_audio_backlog", f"user audio arrives faster than real time: more "
                                                       f"than {MAX_BACKLOG_S:.0f} s queued, the excess is "
                                                       f"not listened to", "pcm16")
            self.dropped_samples += int(audio.size)
            return
        self.backlog_samples += int(audio.size)
        self.audio_queue.put_nowait(np.nan_to_num(audio))  # a writable copy

    async def on_user_text(self, env: Envelope, headers: dict[str, str], reply: str) -> None:
        if kind_of(env) != "user_text":
            await self.error("user_text", f"body: expected user_text, got {kind_of(env)!r}", "body")
            return
        text = env.user_text.text.strip()[:MAX_TEXT_CHARS]
        if text:
            self.start_reply(text)

    async def listen(self) -> None:
        """One task per session: VAD, partial and final transcripts, in arrival order."""
        every = int(self.worker.settings.partial_every_s * self.sample_rate)
        while True:
            samples = await self.audio_queue.get()
            self.backlog_samples -= samples.size
            if self.a2a is not None:
                await self.a2a.send_audio((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
                continue
            for event in await asyncio.to_thread(self.turns.push, samples):
                if event.kind == "speech_started":
                    self.in_speech = True
                    self.utterance, self.utterance_samples = [], 0
                    self.partial_due = every
                    self.cancel_reply("user_started")
                    await self.turn(pb.TURN_KIND_USER_STARTED, self.reply_id)
                elif event.kind == "speech_ended":
                    self.in_speech = False
                    await self.turn(pb.TURN_KIND_USER_ENDED, self.reply_id,
                                    "truncated" if getattr(event, "truncated", False) else "")
                    # recognised off the listening path, so a barge-in right after is still heard
                    self.tasks.spawn(self.finish_utterance(event.speech), "final")
            if self.in_speech:
                self.utterance.append(samples)
                self.utterance_samples += samples.size
                if (self.partial_due <= self.utterance_samples <= MAX_PARTIAL_S * self.sample_rate
                        and (self.partial_task is None or self.partial_task.done())):
                    self.partial_due = self.utterance_samples + every
                    self.partial_task = self.tasks.spawn(self.partial(np.concatenate(self.utterance)),
                                                         "partial")

    async def partial(self, audio: np.ndarray) -> None:
        """A partial transcript of the utterance so far; never delays end-of-turn detection (it
        runs beside the listening loop, at most one at a time)."""
        text = (await asyncio.to_thread(self.worker.models.recognizer.transcribe, audio, self.sample_rate)).text.strip()
        if text and self.in_speech:
            await self.transcript(text, False, "user")

    async def finish_utterance(self, speech: np.ndarray | None) -> None:
        if speech is None or speech.size == 0:
            return
        text = (await asyncio.to_thread(self.worker.models.recognizer.transcribe, speech, self.sample_rate)).text.strip()
        if not text:
            await self.turn(pb.TURN_KIND_USER_ENDED, self.reply_id, "no words recognised")
            return
        await self.transcript(text, True, "user")
        self.start_reply(text)

    # -- replies -----------------------------------------------------------------------------
    def cancel_reply(self, reason: str) -> None:
        if self.reply_task is not None and not self.reply_task.done():
            self.worker.log.info("reply_cancelled", session_id=self.session_id, reply=self.reply_id,
                                 reason=reason)
            self.reply_task.cancel()

    def start_reply(self, user_text: str) -> None:
        from livestage.speech import ChatTurn

        if not self.tasks.running:  # the session failed and is being detached
            return
        self.cancel_reply("new user turn")
        self.history.append(ChatTurn("user", user_text))
        self.history = self.history[-2 * self.worker.settings.history_turns:]
        self.reply_id += 1
        self.reply_task = self.tasks.spawn(self.reply(self.reply_id), f"reply-{self.reply_id}")

    async def reply(self, reply_id: int) -> None:
        """Streams the reply text and hands its sentences to `speak` as they complete. A failing
        language model is reported as `reply_failed` and the session goes on (the next turn may
        work); speech that fails beyond a timeout is the session's failure."""
        from livestage.speech import ChatTurn, SentenceSplitter

        sentences: asyncio.Queue = asyncio.Queue()
        speaker = self.tasks.spawn(self.speak(reply_id, sentences), f"speak-{reply_id}")
        splitter = SentenceSplitter()
        parts: list[str] = []
        try:
            started = False
            async for delta in self.worker.models.reply_model.stream_reply(self.persona, list(self.history)):
                if not delta:
                    continue
                if not started:
                    started = True
                    await self.turn(pb.TURN_KIND_REPLY_STARTED, reply_id)
                parts.append(delta)
                await self.report(pb.ReplyText(reply=reply_id, delta=delta, done=False))
                for sentence in splitter.push(delta):
                    sentences.put_nowait(sentence)
            for sentence in splitter.flush():
                sentences.put_nowait(sentence)
            sentences.put_nowait(None)
            text = "".join(parts).strip()
            await self.report(pb.ReplyText(reply=reply_id, delta="", done=True))
            if text:
                await self.transcript(text, True, "character")
                self.history.append(ChatTurn("assistant", text))
        except asyncio.CancelledError:
            speaker.cancel()
            raise
        except Exception as exc:
            speaker.cancel()
            self.worker.log.exception("reply_failed", session_id=self.session_id)
            await self.error("reply_failed", str(exc)[:500])
            return
        try:
            await speaker
        except asyncio.CancelledError:
            speaker.cancel()
            raise
        await self.turn(pb.TURN_KIND_REPLY_FINISHED, reply_id)

    async def speak(self, reply_id: int, sentences: asyncio.Queue) -> None:
        """Sentences to the `tts` service in order; it publishes the audio to the session."""
        seq = 0
        while True:
            sentence = await sentences.get()
            if sentence is None:
                return
            seq += 1
            request = wrap(spb.Synthesize(text=sentence, voice=self.voice, reply=reply_id, seq=seq,
                                          sample_rate=self.sample_rate), self.session_id)
            try:
                answer = await self.worker.bus.request(Subjects.stage_work("tts"), request,
                                                       timeout=self.worker.settings.tts_timeout_s)
            except TimeoutError as exc:  # NoRespondersError included
                await self.error("tts_unavailable", f"no speech for the reply: {exc!r}")
                return
            if kind_of(answer) == "stage_error":
                await self.error("tts", answer.stage_error.message, answer.stage_error.field)
            elif kind_of(answer) != "synthesized":
                await self.error("tts", f"body: the tts service answered {kind_of(answer)!r}", "body")

    # -- external audio-to-audio -------------------------------------------------------------
    async def relay_a2a(self) -> None:
        """Speech and text of the external system back to the session, one reply per `end`.
        The system hanging up is the session's failure (nothing would answer any more)."""
        reply_id, seq = self.reply_id + 1, 0
        async for event in self.a2a.events():
            if event.kind == "audio" and event.audio is not None and event.audio.size:
                if reply_id > self.reply_id:
                    self.reply_id = reply_id
                    await self.turn(pb.TURN_KIND_REPLY_STARTED, reply_id)
                seq += 1
                audio = resample_audio(np.asarray(event.audio, np.float32), event.sample_rate, self.sample_rate)
                body = build(spb.SpeakAudio, reply=reply_id, seq=seq, sample_rate=self.sample_rate,
                             audio=tensor(np.asarray(audio, np.float32)))
                await self.worker.bus.publish(Subjects.session_speak_audio(self.session_id), wrap(body, self.session_id))
            elif event.kind == "transcript":
                await self.transcript(event.text, True, "user")
            elif event.kind == "reply_text":
                await self.report(pb.ReplyText(reply=reply_id, delta=event.text, done=False))
            elif event.kind == "end":
                await self.turn(pb.TURN_KIND_REPLY_FINISHED, reply_id)
                reply_id, seq = self.reply_id + 1, 0
        if not self.closing:
            raise ConnectionError("the audio-to-audio system closed the connection")

    async def close(self) -> None:
        self.closing = True
        self.cancel_reply("session closed")
        await self.tasks.close()
        for sub in self.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self.a2a is not None:
            with contextlib.suppress(Exception):
                await self.a2a.close()


class DialogueWorker(SessionAttachedWorker[DialogueSession]):
    stage = "dialogue"
    attach_kind = "dialogue"

    def __init__(self, proc: ServiceProcess, models: DialogueModels):
        super().__init__(proc)
        self.models = models
        self.settings: DialogueSettings = proc.settings  # type: ignore[assignment]

    async def open_session(self, session_id: str, body: spb.DialogueAttach,
                           tasks: SessionTasks) -> tuple[DialogueSession, spb.SessionAttached]:
        from livestage.speech import AudioToAudioClient, TurnDetector, VoiceActivityDetector

        if len(body.persona) > MAX_PERSONA_CHARS:
            raise AttachError("character.persona", f"longer than {MAX_PERSONA_CHARS} characters")
        problem = voice_problem(body.voice)
        if problem is not None:
            raise AttachError("character.voice", problem)
        rate = body.sample_rate or self.settings.sample_rate
        if rate != 16000:
            raise AttachError("sample_rate", f"the dialogue listens at 16000 Hz, not {rate}")
        s = DialogueSession(session_id, body.persona, body.voice, rate, self, tasks)
        try:
            if self.settings.dialogue_backend == "a2a":
                s.a2a = AudioToAudioClient(self.settings.a2a_url)
                await s.a2a.connect()
                tasks.spawn(s.relay_a2a(), "a2a")
            else:
                s.turns = TurnDetector(VoiceActivityDetector(), end_silence_ms=self.settings.vad_end_silence_ms,
                                       max_utterance_s=self.settings.max_utterance_s)
            s.subs = [await self.bus.subscribe(Subjects.session_user_audio(session_id), s.on_user_audio),
                      await self.bus.subscribe(Subjects.session_user_text(session_id), s.on_user_text)]
            tasks.spawn(s.listen(), "listen")
        except BaseException:
            await s.close()  # an A2A connection or subscription made so far is let go
            raise
        return s, spb.SessionAttached(backend=self.settings.dialogue_backend)

    async def close_session(self, session: DialogueSession, last_chunk: int) -> spb.SessionDetached:
        await session.close()
        return spb.SessionDetached(replies=session.reply_id)

    async def on_interrupt(self, session: DialogueSession, env: Envelope, interrupt: spb.Interrupt) -> None:
        if interrupt.reply >= session.reply_id:
            session.cancel_reply(interrupt.reason or "interrupt")


def run_dialogue_service() -> None:
    run_service("dialogue", DialogueSettings, DialogueWorker, load=DialogueModels.load)
