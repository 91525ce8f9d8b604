"""The `tts` service: reply text, one sentence per request, to the character's speech.

Stateless: every worker joins the `tts` queue group. The dialogue service sends the sentences of a
reply one after another (`synthesize` requests), so the first sentence is spoken while the
language model still writes the rest, and speech arrives in order. The worker publishes the audio,
resampled to the pipeline's rate, straight to the session (`session.speak_audio`, tagged with the
reply id and sentence number) and answers the request with its duration.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

import numpy as np
from pydantic import Field

from livestage.config import Settings
from livestage.media.audio import resample_audio
from livestage.observability import METRICS, bind_session
from livestage.serving.process import ServiceProcess
from livestage.transport import StageMessage, Subjects


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
    stage = "tts"

    def __init__(self, proc: ServiceProcess, synthesizer):
        self.proc = proc
        self.settings: TTSSettings = proc.settings  # type: ignore[assignment]
        self.synth = synthesizer
        self.log = proc.log

    async def start(self) -> None:
        await self.proc.bus.subscribe(Subjects.stage_work(self.stage), self._on_request,
                                      queue=Subjects.queue_group(self.stage))

    async def _fail(self, reply: str, sid: str, field: str, message: str) -> None:
        METRICS.errors.labels(kind="tts").inc()
        await self.proc.bus.respond(reply, StageMessage("error", sid, meta={
            "field": field, "error": f"{field}: {message}"}))

    async def _on_request(self, msg: StageMessage, headers: dict, reply: str) -> None:
        sid = msg.session_id
        with bind_session(sid):
            if msg.kind != "synthesize":
                await self._fail(reply, sid, "kind", f"unknown request {msg.kind!r}")
                return
            text = msg.meta.get("text", "")
            if not sid:
                await self._fail(reply, sid, "session_id", "required")
                return
            if len(text) > self.settings.tts_max_chars:
                await self._fail(reply, sid, "text", f"{len(text)} characters, more than "
                                                     f"{self.settings.tts_max_chars} in one sentence")
                return
            rate = int(msg.meta.get("sample_rate", "") or self.settings.sample_rate)
            voice = msg.meta.get("voice", "") or self.settings.tts_voice
            t0 = time.perf_counter()
            try:
                audio = await self.synth.synthesize_async(text, voice)
            except Exception as exc:
                self.log.exception("tts_failed", text=text[:80])
                await self._fail(reply, sid, "text", f"synthesis failed: {exc}")
                return
            audio = resample_audio(np.asarray(audio, np.float32), self.synth.sample_rate, rate)
            elapsed = time.perf_counter() - t0
            seconds = audio.size / rate
            METRICS.stage_latency.labels(stage="tts").observe(elapsed)
            if audio.size:
                await self.proc.bus.publish(Subjects.session_speak_audio(sid), StageMessage(
                    "speak_audio", sid, meta={"reply": msg.meta.get("reply", "0"),
                                              "seq": msg.meta.get("seq", "0"),
                                              "sample_rate": str(rate), "text": text[:200]},
                    tensors={"audio": audio}))
            self.log.info("tts_sentence", chars=len(text), seconds=round(seconds, 3),
                          rtf=round(elapsed / seconds, 3) if seconds else None)
            await self.proc.bus.respond(reply, StageMessage("synthesized", sid, meta={
                "seconds": f"{seconds:.4f}", "compute_s": f"{elapsed:.4f}"}))


def run_tts_service() -> None:
    from livestage.config import load_settings

    settings = load_settings(TTSSettings, service="tts")

    async def main() -> None:
        proc = ServiceProcess(settings, "tts")
        synth = await asyncio.to_thread(make_synthesizer, settings)

        async def setup() -> None:
            await TTSWorker(proc, synth).start()

        await proc.run(setup)

    asyncio.run(main())
