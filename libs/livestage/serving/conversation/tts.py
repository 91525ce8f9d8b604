"""The `tts` service: reply text, one sentence per request, to the character's speech.

Stateless: every worker joins the `tts` queue group. The dialogue service sends the sentences of a
reply one after another (`Synthesize` requests), so the first sentence is spoken while the
language model still writes the rest, and speech arrives in order. The worker publishes the audio,
resampled to the pipeline's rate, straight to the session (`session.speak_audio`, a `SpeakAudio` tagged with the
reply id and sentence number) and answers the request with `Synthesized` (its duration), or
`StageError` naming the field it refused. It holds no sessions, so it sends no heartbeats.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
from pydantic import Field

from livestage.config import Settings
from livestage.media.audio import resample_audio
from livestage.observability import METRICS, bind_session
from livestage.protos import stages_pb2 as spb
from livestage.serving.process import ServiceProcess, run_service
from livestage.transport import Envelope, build, Subjects, error_envelope, kind_of, tensor, wrap

MIN_RATE, MAX_RATE = 8000, 48000


class TTSSettings(Settings):
    tts_backend: Literal["piper", "http"] = "piper"
    """`piper`: the built-in offline voice; `http`: an OpenAI-compatible `/audio/speech` endpoint."""
    tts_model_dir: str = ""
    """Directory with a Piper voice (`*.onnx` + `*.onnx.json`) replacing the packaged one."""
    tts_base_url: str = ""
    tts_api_key: str = ""
    tts_model: str = "tts-1"
    tts_voice: str = ""
    """Default voice when the character names none."""
    tts_max_chars: int = Field(1000, gt=0)


def make_synthesizer(settings: TTSSettings):
    from livestage.speech import HttpSpeechSynthesizer, PiperSynthesizer

    if settings.tts_backend == "http":
        if not settings.tts_base_url:
            raise ValueError("LIVESTAGE_TTS_BASE_URL is required with LIVESTAGE_TTS_BACKEND=http")
        return HttpSpeechSynthesizer(settings.tts_base_url, api_key=settings.tts_api_key,
                                     model=settings.tts_model, voice=settings.tts_voice or "alloy")
    return PiperSynthesizer(model_dir=settings.tts_model_dir or None)


class TTSWorker:
    """The `tts` queue-group member: one `Synthesize` request at a time per subscription."""

    stage = "tts"

    def __init__(self, proc: ServiceProcess, synthesizer: Any):
        self.proc = proc
        self.settings: TTSSettings = proc.settings  # type: ignore[assignment]
        self.synth = synthesizer
        self.log = proc.log
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self.proc.bus.subscribe(Subjects.stage_work(self.stage), self._on_request,
                                                  queue=Subjects.queue_group(self.stage))

    async def drain(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()

    def sessions_held(self) -> int | None:
        return None  # stateless: no heartbeats, any member takes any sentence

    async def _fail(self, reply: str, env: Envelope, field: str, message: str) -> None:
        METRICS.errors.labels(kind="tts").inc()
        await self.proc.bus.respond(reply, error_envelope(f"{field}: {message}", field, like=env))

    async def _on_request(self, env: Envelope, headers: dict[str, str], reply: str) -> None:
        sid = env.session_id
        with bind_session(sid):
            if kind_of(env) != "synthesize":
                await self._fail(reply, env, "body", f"expected synthesize, got {kind_of(env)!r}")
                return
            req = env.synthesize
            if not sid:
                await self._fail(reply, env, "session_id", "required")
                return
            if len(req.text) > self.settings.tts_max_chars:
                await self._fail(reply, env, "text", f"{len(req.text)} characters, more than "
                                                     f"{self.settings.tts_max_chars} in one sentence")
                return
            rate = req.sample_rate or self.settings.sample_rate
            if not MIN_RATE <= rate <= MAX_RATE:
                await self._fail(reply, env, "sample_rate", f"must be {MIN_RATE}..{MAX_RATE}, got {rate}")
                return
            voice = req.voice or self.settings.tts_voice
            t0 = time.perf_counter()
            try:
                audio = await self.synth.synthesize_async(req.text, voice)
            except Exception as exc:
                self.log.exception("tts_failed", text=req.text[:80])
                await self._fail(reply, env, "text", f"synthesis failed: {exc}")
                return
            audio = np.asarray(resample_audio(np.asarray(audio, np.float32), self.synth.sample_rate, rate),
                               np.float32)
            elapsed = time.perf_counter() - t0
            seconds = audio.size / rate
            METRICS.stage_latency.labels(stage="tts").observe(elapsed)
            if audio.size:
                body = build(spb.SpeakAudio, reply=req.reply, seq=req.seq, sample_rate=rate, audio=tensor(audio),
                             text=req.text[:200])
                await self.proc.bus.publish(Subjects.session_speak_audio(sid), wrap(body, sid))
            self.log.info("tts_sentence", chars=len(req.text), seconds=round(seconds, 3),
                          rtf=round(elapsed / seconds, 3) if seconds else None)
            await self.proc.bus.respond(reply, wrap(spb.Synthesized(seconds=seconds, compute_s=elapsed),
                                                    sid, epoch=env.epoch))


def run_tts_service() -> None:
    run_service("tts", TTSSettings, TTSWorker, load=make_synthesizer)
