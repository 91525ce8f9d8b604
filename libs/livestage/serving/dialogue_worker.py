"""The `dialogue` service: listens to the user, decides when a turn ends, and answers.

Backends (`LIVESTAGE_DIALOGUE_BACKEND`):
- `builtin`: voice activity + end of turn (silero VAD), streaming speech recognition (Whisper
  tiny.en through faster-whisper), a reply from a small local language model (Gemma-3-270M GGUF
  through llama.cpp), spoken by the `tts` service sentence by sentence;
- `openai`: the same, but the reply streams from an OpenAI-compatible chat endpoint
  (`LIVESTAGE_LLM_BASE_URL`: vLLM, llama.cpp server, a hosted API);
- `a2a`: an external audio-to-audio system does everything; this service only forwards the
  user's audio to it and its speech back to the session.

What goes out on `session.dialogue`: `transcript` (partial and final, speaker user/character),
`turn` (user_started, user_ended, reply_started, reply_finished) and `reply_text` deltas; speech
goes to `session.speak_audio` (through `tts`, or from the A2A system). A new user utterance, an
interrupt (`control`) or the session's end cancels the reply being written or spoken.
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
from livestage.serving.attached_worker import AttachError, SessionAttachedWorker, run_attached_service
from livestage.serving.process import ServiceProcess
from livestage.transport import NoRespondersError, StageMessage, Subjects

MAX_PERSONA_CHARS = 4000
MAX_USER_TEXT_CHARS = 4000
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
    session_id: str
    persona: str
    voice: str
    sample_rate: int
    worker: "DialogueWorker"
    history: list[Any] = field(default_factory=list)
    reply_id: int = 0
    reply_task: asyncio.Task | None = None
    audio_queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    listen_task: asyncio.Task | None = None
    subs: list[Any] = field(default_factory=list)
    turns: Any = None
    a2a: Any = None
    a2a_task: asyncio.Task | None = None
    in_speech: bool = False
    utterance: list = field(default_factory=list)
    utterance_samples: int = 0
    partial_due: int = 0
    partial_task: asyncio.Task | None = None
    final_task: asyncio.Task | None = None
    backlog_samples: int = 0
    dropped_samples: int = 0

    # -- outputs -----------------------------------------------------------------------------
    async def send(self, kind: str, **meta: object) -> None:
        await self.worker.bus.publish(Subjects.session_dialogue(self.session_id), StageMessage(
            kind, self.session_id, meta={k: str(v) for k, v in meta.items()}))

    # -- user input --------------------------------------------------------------------------
    async def on_user_audio(self, msg: StageMessage, headers: dict, reply: str) -> None:
        audio = msg.tensors.get("audio")
        rate = int(msg.meta.get("sample_rate", "0") or 0)
        if audio is None or audio.ndim != 1 or rate != self.sample_rate:
            await self.send("error", code="user_audio", field="sample_rate",
                            message=f"user audio must be mono at {self.sample_rate} Hz, got {rate} Hz")
            return
        if self.backlog_samples > MAX_BACKLOG_S * self.sample_rate:
            # A microphone delivers in real time; audio arriving much faster than the dialogue can
            # listen (a file pushed at once, 30 min in a burst) is dropped, not queued forever.
            if not self.dropped_samples:
                await self.send("error", code="user_audio_backlog", field="pcm16",
                                message=f"user audio arrives faster than real time: more than "
                                        f"{MAX_BACKLOG_S:.0f} s queued, the excess is not listened to")
            self.dropped_samples += int(audio.size)
            return
        self.backlog_samples += int(audio.size)
        self.audio_queue.put_nowait(np.nan_to_num(np.asarray(audio, np.float32)))

    async def on_user_text(self, msg: StageMessage, headers: dict, reply: str) -> None:
        text = msg.meta.get("text", "").strip()[:MAX_USER_TEXT_CHARS]
        if text:
            self.start_reply(text)

    async def listen(self) -> None:
        """One task per session: VAD, partial and final transcripts, in arrival order."""
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
                    self.partial_due = int(self.worker.settings.partial_every_s * self.sample_rate)
                    self.cancel_reply("user_started")
                    await self.send("turn", event="user_started", reply=self.reply_id)
                elif event.kind == "speech_ended":
                    self.in_speech = False
                    await self.send("turn", event="user_ended", reply=self.reply_id,
                                    detail="truncated" if getattr(event, "truncated", False) else "")
                    # recognised off the listening path, so a barge-in right after is still heard
                    self.final_task = asyncio.create_task(self.finish_utterance(event.speech))
            if self.in_speech:
                self.utterance.append(samples)
                self.utterance_samples += samples.size
                if (self.utterance_samples >= self.partial_due and self.utterance_samples <= MAX_PARTIAL_S * self.sample_rate
                        and (self.partial_task is None or self.partial_task.done())):
                    self.partial_due = self.utterance_samples + int(self.worker.settings.partial_every_s * self.sample_rate)
                    self.partial_task = asyncio.create_task(self.partial(np.concatenate(self.utterance)))

    async def partial(self, audio: np.ndarray) -> None:
        """A partial transcript of the utterance so far; never delays end-of-turn detection (it
        runs beside the listening loop, at most one at a time)."""
        text = (await asyncio.to_thread(self.worker.models.recognizer.transcribe, audio, self.sample_rate)).text.strip()
        if text and self.in_speech:
            await self.send("transcript", text=text, final=0, speaker="user")

    async def finish_utterance(self, speech: np.ndarray | None) -> None:
        if speech is None or speech.size == 0:
            return
        text = (await asyncio.to_thread(self.worker.models.recognizer.transcribe, speech, self.sample_rate)).text.strip()
        if not text:
            await self.send("turn", event="user_ended", reply=self.reply_id, detail="no words recognised")
            return
        await self.send("transcript", text=text, final=1, speaker="user")
        self.start_reply(text)

    # -- replies -----------------------------------------------------------------------------
    def cancel_reply(self, reason: str) -> None:
        if self.reply_task is not None and not self.reply_task.done():
            self.worker.log.info("reply_cancelled", session_id=self.session_id, reply=self.reply_id,
                                 reason=reason)
            self.reply_task.cancel()

    def start_reply(self, user_text: str) -> None:
        from livestage.speech import ChatTurn

        self.cancel_reply("new user turn")
        self.history.append(ChatTurn("user", user_text))
        self.history = self.history[-2 * self.worker.settings.history_turns:]
        self.reply_id += 1
        self.reply_task = asyncio.create_task(self.reply(self.reply_id))

    async def reply(self, reply_id: int) -> None:
        from livestage.speech import ChatTurn, SentenceSplitter

        sentences: asyncio.Queue = asyncio.Queue()
        speaker = asyncio.create_task(self.speak(reply_id, sentences))
        splitter = SentenceSplitter()
        parts: list[str] = []
        try:
            started = False
            async for delta in self.worker.models.reply_model.stream_reply(self.persona, list(self.history)):
                if not delta:
                    continue
                if not started:
                    started = True
                    await self.send("turn", event="reply_started", reply=reply_id)
                parts.append(delta)
                await self.send("reply_text", reply=reply_id, delta=delta, done=0)
                for sentence in splitter.push(delta):
                    sentences.put_nowait(sentence)
            for sentence in splitter.flush():
                sentences.put_nowait(sentence)
            sentences.put_nowait(None)
            text = "".join(parts).strip()
            await self.send("reply_text", reply=reply_id, delta="", done=1)
            if text:
                await self.send("transcript", text=text, final=1, speaker="character", reply=reply_id)
                self.history.append(ChatTurn("assistant", text))
            await speaker
            await self.send("turn", event="reply_finished", reply=reply_id)
        except asyncio.CancelledError:
            speaker.cancel()
            raise
        except Exception as exc:
            speaker.cancel()
            self.worker.log.exception("reply_failed", session_id=self.session_id)
            await self.send("error", code="reply_failed", message=str(exc)[:500])

    async def speak(self, reply_id: int, sentences: asyncio.Queue) -> None:
        """Sentences to the `tts` service in order; it publishes the audio to the session."""
        seq = 0
        while True:
            sentence = await sentences.get()
            if sentence is None:
                return
            seq += 1
            try:
                answer = await self.worker.bus.request(
                    Subjects.stage_work("tts"), StageMessage("synthesize", self.session_id, meta={
                        "text": sentence, "voice": self.voice, "reply": str(reply_id), "seq": str(seq),
                        "sample_rate": str(self.sample_rate)}),
                    timeout=self.worker.settings.tts_timeout_s)
            except (NoRespondersError, TimeoutError) as exc:
                await self.send("error", code="tts_unavailable", message=f"no speech for the reply: {exc!r}")
                return
            if answer.kind == "error":
                await self.send("error", code="tts", field=answer.meta.get("field", ""),
                                message=answer.meta.get("error", ""))

    # -- external audio-to-audio -------------------------------------------------------------
    async def relay_a2a(self) -> None:
        """Speech and text of the external system back to the session, one reply per `end`."""
        reply_id = self.reply_id + 1
        async for event in self.a2a.events():
            if event.kind == "audio" and event.audio is not None and event.audio.size:
                if reply_id > self.reply_id:
                    self.reply_id = reply_id
                    await self.send("turn", event="reply_started", reply=reply_id)
                audio = resample_audio(event.audio, event.sample_rate, self.sample_rate)
                await self.worker.bus.publish(Subjects.session_speak_audio(self.session_id), StageMessage(
                    "speak_audio", self.session_id, meta={"reply": str(reply_id),
                                                          "sample_rate": str(self.sample_rate)},
                    tensors={"audio": audio}))
            elif event.kind == "transcript":
                await self.send("transcript", text=event.text, final=1, speaker="user")
            elif event.kind == "reply_text":
                await self.send("reply_text", reply=reply_id, delta=event.text, done=0)
            elif event.kind == "end":
                await self.send("turn", event="reply_finished", reply=reply_id)
                reply_id = self.reply_id + 1

    async def close(self) -> None:
        self.cancel_reply("session closed")
        for task in (self.listen_task, self.a2a_task, self.reply_task, self.partial_task, self.final_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for sub in self.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self.a2a is not None:
            with contextlib.suppress(Exception):
                await self.a2a.close()


class DialogueWorker(SessionAttachedWorker[DialogueSession]):
    stage = "dialogue"

    def __init__(self, proc: ServiceProcess, models: DialogueModels):
        super().__init__(proc)
        self.models = models
        self.settings: DialogueSettings = proc.settings  # type: ignore[assignment]

    async def open_session(self, msg: StageMessage) -> tuple[DialogueSession, dict[str, str]]:
        from livestage.speech import AudioToAudioClient, TurnDetector, VoiceActivityDetector

        persona = msg.meta.get("persona", "")
        if len(persona) > MAX_PERSONA_CHARS:
            raise AttachError(f"character.persona: longer than {MAX_PERSONA_CHARS} characters")
        rate = int(msg.meta.get("sample_rate", "") or self.settings.sample_rate)
        if rate != 16000:
            raise AttachError(f"sample_rate: the dialogue listens at 16000 Hz, not {rate}")
        s = DialogueSession(msg.session_id, persona, msg.meta.get("voice", ""), rate, self)
        if self.settings.dialogue_backend == "a2a":
            s.a2a = AudioToAudioClient(self.settings.a2a_url)
            await s.a2a.connect()
            s.a2a_task = asyncio.create_task(s.relay_a2a())
        else:
            s.turns = TurnDetector(VoiceActivityDetector(), end_silence_ms=self.settings.vad_end_silence_ms,
                                   max_utterance_s=self.settings.max_utterance_s)
        s.subs = [await self.bus.subscribe(Subjects.session_user_audio(s.session_id), s.on_user_audio),
                  await self.bus.subscribe(Subjects.session_user_text(s.session_id), s.on_user_text)]
        s.listen_task = asyncio.create_task(s.listen())
        return s, {"backend": self.settings.dialogue_backend}

    async def close_session(self, session: DialogueSession, msg: StageMessage) -> dict[str, str]:
        await session.close()
        return {"replies": str(session.reply_id)}

    async def on_control(self, session: DialogueSession, msg: StageMessage) -> None:
        if msg.meta.get("action") == "interrupt":
            if int(msg.meta.get("reply", "0") or 0) >= session.reply_id:
                session.cancel_reply(msg.meta.get("reason", "interrupt"))


def run_dialogue_service() -> None:
    run_attached_service("dialogue", DialogueSettings, DialogueWorker, DialogueModels.load)
