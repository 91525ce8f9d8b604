"""Speech recognition: Whisper tiny.en (CTranslate2) through faster-whisper, and the streaming
wrapper that gives partial transcripts while the user is still talking."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from livestage.observability import get_logger
from livestage.speech.assets import ASSETS

log = get_logger("livestage.speech.asr")

SAMPLE_RATE = 16000


@dataclass
class Transcription:
    text: str
    seconds: float
    """Length of the audio that was transcribed."""


class SpeechRecognizer(Protocol):
    def transcribe(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Transcription: ...


def _check(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"sample_rate: speech recognition takes {SAMPLE_RATE} Hz, got {sample_rate}")
    arr = np.asarray(samples, dtype=np.float32).reshape(-1)
    if arr.size and not np.isfinite(arr).all():
        raise ValueError("samples: audio contains NaN or infinite values")
    return arr


class WhisperRecognizer:
    """Greedy, English, no internal VAD (turns are already cut), no conditioning on earlier text
    (each utterance stands alone; it avoids the repetition loops Whisper is known for)."""

    def __init__(self, model_dir: str | None = None, compute_type: str = "int8", threads: int = 2):
        from faster_whisper import WhisperModel

        started = time.perf_counter()
        root = ASSETS["asr"].resolve(model_dir)
        self._model = WhisperModel(str(root), device="cpu", compute_type=compute_type, cpu_threads=threads)
        self._lock = threading.Lock()  # one decode at a time per model (CTranslate2 replica)
        log.info("asr_loaded", path=str(root), seconds=round(time.perf_counter() - started, 2))

    def transcribe(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Transcription:
        arr = _check(samples, sample_rate)
        seconds = arr.size / SAMPLE_RATE
        if arr.size < SAMPLE_RATE // 10 or float(np.abs(arr).max(initial=0.0)) < 1e-4:
            return Transcription("", seconds)  # nothing (or digital silence) to recognise
        with self._lock:
            segments, _ = self._model.transcribe(arr, beam_size=1, language="en", vad_filter=False,
                                                 condition_on_previous_text=False, without_timestamps=True)
            text = " ".join(s.text.strip() for s in segments if s.no_speech_prob < 0.8)
        return Transcription(" ".join(text.split()), seconds)


class StreamingTranscriber:
    """Partial transcripts of the utterance so far, at most every `partial_every_s` of new audio;
    `finish()` gives the final one. Whisper has no incremental decoder, so a partial re-reads
    the utterance: cheap for the few seconds a conversational turn lasts."""

    def __init__(self, recognizer: SpeechRecognizer, partial_every_s: float = 1.0, max_partial_s: float = 15.0):
        self.recognizer = recognizer
        self.partial_every = int(partial_every_s * SAMPLE_RATE)
        self.max_partial = int(max_partial_s * SAMPLE_RATE)
        self.reset()

    def reset(self) -> None:
        self._pieces: list[np.ndarray] = []
        self._size = 0
        self._next_partial = self.partial_every

    def push(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> str | None:
        """Adds audio; returns a partial transcript when `partial_every_s` of new audio has come
        in since the last one (None otherwise, and past `max_partial_s`, where re-reading the
        whole utterance per partial would cost more than it is worth)."""
        arr = _check(samples, sample_rate)
        self._pieces.append(arr)
        self._size += arr.size
        if self._size < self._next_partial or self._size > self.max_partial:
            return None
        self._next_partial = self._size + self.partial_every
        text = self.recognizer.transcribe(np.concatenate(self._pieces)).text
        return text or None

    def finish(self) -> str:
        """The final transcript of everything pushed since the last reset; then resets."""
        text = self.recognizer.transcribe(np.concatenate(self._pieces)).text if self._pieces else ""
        self.reset()
        return text
