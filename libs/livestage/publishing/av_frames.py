"""One chunk of the avatar's media and its conversion into per-frame video/audio pairs.

A chunk is `fps` frames plus the speech aligned with them. Video frame i of the session owns audio
samples [round(i * rate / fps), round((i+1) * rate / fps)), so rates that do not divide evenly
(16 kHz at 24 fps: 666.67 samples per frame) never lose or duplicate a sample across chunks; a
chunk whose audio is shorter or longer than its frames is padded/trimmed and the difference is
counted as drift.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class AVChunk:
    chunk_index: int
    frames: np.ndarray
    """uint8 [T, H, W, 3]."""
    audio: np.ndarray
    """float32 mono in [-1, 1]."""
    sample_rate: int
    fps: int
    epoch: int = 0

    def validate(self) -> None:
        f = self.frames
        if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3 or not f.shape[0]:
            raise ValueError(f"frames: expected uint8 [T, H, W, 3], got "
                             f"{getattr(f, 'dtype', type(f))} {getattr(f, 'shape', '')}")
        a = self.audio
        if not isinstance(a, np.ndarray) or a.ndim != 1:
            raise ValueError(f"audio: expected mono float samples [n], got shape {getattr(a, 'shape', type(a))}")
        if self.fps < 1 or self.sample_rate < 1:
            raise ValueError(f"fps/sample_rate must be positive, got {self.fps}/{self.sample_rate}")


class FrameAudioAligner:
    """Cuts each chunk's audio into the exact span of each of its video frames."""

    def __init__(self, sample_rate: int, fps: int):
        self.sample_rate = sample_rate
        self.fps = fps
        self.frames_done = 0
        self.drift_samples = 0
        """Audio received minus audio the frames needed, summed (positive: audio was trimmed)."""

    def _bound(self, frame: int) -> int:
        return int(round(frame * self.sample_rate / self.fps))

    def split(self, chunk: AVChunk) -> list[tuple[np.ndarray, np.ndarray]]:
        chunk.validate()
        if chunk.sample_rate != self.sample_rate or chunk.fps != self.fps:
            raise ValueError(f"sample_rate/fps: chunk has {chunk.sample_rate}/{chunk.fps}, "
                             f"stream is {self.sample_rate}/{self.fps}")
        t = chunk.frames.shape[0]
        start = self._bound(self.frames_done)
        need = self._bound(self.frames_done + t) - start
        audio = np.nan_to_num(chunk.audio.astype(np.float32, copy=False))
        self.drift_samples += audio.size - need
        if audio.size < need:
            audio = np.concatenate([audio, np.zeros(need - audio.size, np.float32)])
        out = []
        for i in range(t):
            a, b = self._bound(self.frames_done + i) - start, self._bound(self.frames_done + i + 1) - start
            out.append((chunk.frames[i], audio[a:b]))
        self.frames_done += t
        return out

    def skip(self, frames: int) -> None:
        """Frames that were dropped (interrupt): their audio span is dropped too."""
        self.frames_done += frames


def to_pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def to_rtc_frames(frame: np.ndarray, audio: np.ndarray, sample_rate: int):
    """(rtc.VideoFrame RGB24 -> I420 as published, rtc.AudioFrame int16 mono)."""
    from livekit import rtc

    h, w, _ = frame.shape
    video = rtc.VideoFrame(w, h, rtc.VideoBufferType.RGB24, np.ascontiguousarray(frame).tobytes())
    sound = rtc.AudioFrame(to_pcm16(audio), sample_rate, 1, int(audio.size))
    return video, sound
