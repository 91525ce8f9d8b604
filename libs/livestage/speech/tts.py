"""Speech synthesis: the packaged Piper voice offline, or an OpenAI-compatible `/audio/speech`
endpoint. Both give float32 mono at their own `sample_rate` (the caller resamples), and both
have `synthesize_async` so the `tts` service's event loop never blocks on a voice."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Protocol

import numpy as np

from livestage.observability import get_logger
from livestage.speech.assets import ASSETS
from livestage.speech.sentences import SentenceSplitter

__all__ = ["HttpSpeechSynthesizer", "PiperSynthesizer", "SentenceSplitter", "SpeechSynthesisError",
           "SpeechSynthesizer"]

log = get_logger("livestage.speech.tts")
_EMPTY = np.zeros(0, np.float32)


class SpeechSynthesisError(RuntimeError):
    """The voice or the endpoint failed (status and body excerpt in the message)."""


class SpeechSynthesizer(Protocol):
    sample_rate: int

    def synthesize(self, text: str, voice: str = "") -> np.ndarray: ...

    async def synthesize_async(self, text: str, voice: str = "") -> np.ndarray: ...


class PiperSynthesizer:
    """Piper en_US-joe-medium (22.05 kHz) from its registry package, or any Piper voice directory
    (`*.onnx` + `*.onnx.json`). Single-speaker voices ignore `voice`; a multi-speaker one takes
    a speaker id ("3") or a speaker name from its config."""

    def __init__(self, model_dir: str | None = None):
        from piper import PiperVoice

        started = time.perf_counter()
        onnx = ASSETS["tts"].file(model_dir)
        self._voice = PiperVoice.load(str(onnx), config_path=str(onnx) + ".json")
        self.sample_rate = int(self._voice.config.sample_rate)
        self._lock = threading.Lock()  # one ONNX session per voice; calls are serialised
        log.info("voice_loaded", path=str(onnx), sample_rate=self.sample_rate,
                 seconds=round(time.perf_counter() - started, 2))

    def _speaker(self, voice: str) -> int | None:
        config = self._voice.config
        if config.num_speakers <= 1 or not voice:
            return None
        if voice.isdigit():
            return int(voice) if int(voice) < config.num_speakers else None
        return (config.speaker_id_map or {}).get(voice)

    def synthesize(self, text: str, voice: str = "") -> np.ndarray:
        from piper import SynthesisConfig

        text = " ".join(text.split())
        if not text:
            return _EMPTY.copy()
        with self._lock:
            chunks = [c.audio_float_array for c in
                      self._voice.synthesize(text, SynthesisConfig(speaker_id=self._speaker(voice)))]
        return np.concatenate(chunks).astype(np.float32, copy=False) if chunks else _EMPTY.copy()

    async def synthesize_async(self, text: str, voice: str = "") -> np.ndarray:
        return await asyncio.to_thread(self.synthesize, text, voice)


class HttpSpeechSynthesizer:
    """OpenAI-compatible `POST {base_url}/audio/speech` with `response_format: "pcm"`: the body
    is 16-bit little-endian mono PCM at `sample_rate` (24 kHz for OpenAI)."""

    def __init__(self, base_url: str, api_key: str = "", model: str = "tts-1", voice: str = "alloy",
                 sample_rate: int = 24000, timeout_s: float = 30.0):
        self.url = base_url.rstrip("/") + "/audio/speech"
        self.api_key, self.model, self.voice = api_key, model, voice
        self.sample_rate = sample_rate
        self.timeout_s = timeout_s

    def _request(self, text: str, voice: str) -> tuple[dict, dict]:
        body = {"model": self.model, "input": text, "voice": voice or self.voice, "response_format": "pcm"}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return body, headers

    def _decode(self, status: int, content: bytes) -> np.ndarray:
        if status >= 400:
            raise SpeechSynthesisError(f"{self.url} answered HTTP {status}: "
                                       f"{content[:300].decode(errors='replace')}")
        if len(content) % 2:
            raise SpeechSynthesisError(f"{self.url} returned {len(content)} bytes, not 16-bit PCM")
        return np.frombuffer(content, "<i2").astype(np.float32) / 32768.0

    def synthesize(self, text: str, voice: str = "") -> np.ndarray:
        import httpx

        if not text.strip():
            return _EMPTY.copy()
        body, headers = self._request(text, voice)
        try:
            resp = httpx.post(self.url, json=body, headers=headers, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise SpeechSynthesisError(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        return self._decode(resp.status_code, resp.content)

    async def synthesize_async(self, text: str, voice: str = "") -> np.ndarray:
        import httpx

        if not text.strip():
            return _EMPTY.copy()
        body, headers = self._request(text, voice)
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                resp = await client.post(self.url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise SpeechSynthesisError(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        return self._decode(resp.status_code, resp.content)
