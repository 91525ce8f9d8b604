"""MP4 output: H.264 video + AAC audio written as chunks arrive, timestamps from zero.

Video frame i is stamped i/fps and audio sample j is stamped j/rate, both from zero, so audio and
video stay in sync to well within one frame however long the recording.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


class Mp4Writer:
    def __init__(self, path: str | Path, fps: int, width: int, height: int, audio_rate: int = 16000,
                 crf: int = 20):
        self.path = Path(path)
        self.fps = fps
        self.audio_rate = audio_rate
        self._container = av.open(str(self.path), mode="w", format="mp4")
        self._video = self._container.add_stream("libx264", rate=fps)
        self._video.width = width
        self._video.height = height
        self._video.pix_fmt = "yuv420p"
        self._video.options = {"preset": "veryfast", "crf": str(crf)}
        self._video.codec_context.time_base = Fraction(1, fps)
        self._audio = self._container.add_stream("aac", rate=audio_rate)
        self._audio.layout = "mono"
        self._frames = 0
        self._samples = 0
        self._pending = np.zeros(0, dtype=np.float32)
        self._closed = False

    @property
    def frames_written(self) -> int:
        return self._frames

    def write_frames(self, frames: np.ndarray) -> None:
        """uint8 frames [T, H, W, 3]."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = self._frames
            frame.time_base = Fraction(1, self.fps)
            for packet in self._video.encode(frame):
                self._container.mux(packet)
            self._frames += 1

    def write_audio(self, samples: np.ndarray) -> None:
        """float32 mono samples at `audio_rate`, appended to the audio track."""
        self._pending = np.concatenate([self._pending, np.asarray(samples, dtype=np.float32).reshape(-1)])
        frame_size = self._audio.codec_context.frame_size or 1024
        while self._pending.size >= frame_size:
            self._encode_audio(self._pending[:frame_size])
            self._pending = self._pending[frame_size:]

    def _encode_audio(self, block: np.ndarray) -> None:
        frame = av.AudioFrame.from_ndarray(np.clip(block, -1, 1)[None, :].astype(np.float32),
                                           format="fltp", layout="mono")
        frame.sample_rate = self.audio_rate
        frame.pts = self._samples
        frame.time_base = Fraction(1, self.audio_rate)
        for packet in self._audio.encode(frame):
            self._container.mux(packet)
        self._samples += block.size

    def close(self) -> None:
        if self._closed:
            return
        if self._pending.size:
            frame_size = self._audio.codec_context.frame_size or 1024
            self._encode_audio(np.pad(self._pending, (0, frame_size - self._pending.size)))
            self._pending = np.zeros(0, dtype=np.float32)
        for packet in self._audio.encode(None):
            self._container.mux(packet)
        for packet in self._video.encode(None):
            self._container.mux(packet)
        self._container.close()
        self._closed = True

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_mp4(path: str | Path) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Decodes an MP4: (frames uint8 [T, H, W, 3], mono audio float32, fps, audio rate)."""
    with av.open(str(path)) as container:
        vstream = container.streams.video[0]
        fps = float(vstream.average_rate or vstream.guessed_rate)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(vstream)]
    audio: list[np.ndarray] = []
    rate = 0
    with av.open(str(path)) as container:
        if container.streams.audio:
            astream = container.streams.audio[0]
            rate = astream.rate
            for f in container.decode(astream):
                arr = f.to_ndarray().astype(np.float32)
                audio.append(arr.reshape(len(f.layout.channels), -1).mean(axis=0) if f.format.is_planar
                             else arr.reshape(-1, len(f.layout.channels)).mean(axis=1))
    samples = np.concatenate(audio) if audio else np.zeros(0, dtype=np.float32)
    return np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8), samples, fps, rate
