"""MP4 output: H.264 video + AAC audio written as chunks arrive, timestamps from zero.

Video frame i is stamped i/fps and audio sample j is stamped j/rate, both from zero, so audio and
video stay in sync to well within one frame however long the recording. Audio is handed to the
encoder as it comes (PyAV re-blocks it into AAC frames); the last AAC frame is padded by the
encoder but the file's edit list records the true length, which `read_mp4` honours.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from livestage.media.errors import MediaError


class Mp4Writer:
    """Streams RGB frames and mono float audio into an H.264 (libx264, yuv420p) + AAC MP4.

    `write_frames` and `write_audio` may be interleaved in any chunk sizes. yuv420p needs even
    dimensions, checked up front. The `moov` atom goes to the front on close (`faststart`), so
    the file plays in a browser before it is fully downloaded. Use as a context manager.
    """

    def __init__(self, path: str | Path, fps: int, width: int, height: int, audio_rate: int = 16000,
                 crf: int = 20):
        if fps < 1 or audio_rate < 1:
            raise ValueError("fps and audio_rate must be positive")
        if width < 2 or height < 2 or width % 2 or height % 2:
            raise ValueError(f"H.264 yuv420p needs even width and height, got {width}x{height}")
        self.path = Path(path)
        self.fps = fps
        self.width = width
        self.height = height
        self.audio_rate = audio_rate
        self._container = av.open(str(self.path), mode="w", format="mp4",
                                  options={"movflags": "+faststart"})
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
        self._closed = False

    @property
    def frames_written(self) -> int:
        return self._frames

    @property
    def video_seconds(self) -> float:
        return self._frames / self.fps

    @property
    def audio_seconds(self) -> float:
        return self._samples / self.audio_rate

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: MP4 writer is closed")

    def write_frames(self, frames: np.ndarray) -> None:
        """uint8 RGB frames [T, H, W, 3] (or one frame [H, W, 3]) of the writer's size."""
        self._check_open()
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
        if frames.shape[1:3] != (self.height, self.width):
            # PyAV would silently rescale a wrong-sized frame; a size mismatch is a caller bug.
            raise ValueError(f"frames are {frames.shape[2]}x{frames.shape[1]}, the writer is "
                             f"{self.width}x{self.height}")
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = self._frames
            frame.time_base = Fraction(1, self.fps)
            for packet in self._video.encode(frame):
                self._container.mux(packet)
            self._frames += 1

    def write_audio(self, samples: np.ndarray) -> None:
        """float32 mono samples at `audio_rate` (clipped to [-1, 1]), appended to the audio track."""
        self._check_open()
        block = np.clip(np.asarray(samples, dtype=np.float32).reshape(-1), -1, 1)
        if block.size == 0:
            return
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block[None, :]), format="fltp", layout="mono")
        frame.sample_rate = self.audio_rate
        frame.pts = self._samples
        frame.time_base = Fraction(1, self.audio_rate)
        for packet in self._audio.encode(frame):
            self._container.mux(packet)
        self._samples += block.size

    def close(self) -> None:
        """Flushes both encoders and finalises the file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            for packet in self._audio.encode(None):
                self._container.mux(packet)
            for packet in self._video.encode(None):
                self._container.mux(packet)
        finally:
            self._container.close()

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_mono(frame: av.AudioFrame) -> np.ndarray:
    arr = frame.to_ndarray().astype(np.float32)
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        return arr.reshape(channels, -1).mean(axis=0)
    return arr.reshape(-1, channels).mean(axis=1)


def read_mp4(path: str | Path) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Decodes an MP4: (frames uint8 [T, H, W, 3], mono audio float32, fps, audio rate).

    Audio is cut to the audio track's recorded duration (the encoder pads its last frame).
    For tests and tools; it holds the whole clip in memory.
    """
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: video file not found")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            vstream = container.streams.video[0]
            fps = float(vstream.average_rate or vstream.guessed_rate or 0)
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(vstream)]
        audio: list[np.ndarray] = []
        rate = 0
        with av.open(str(path)) as container:
            if container.streams.audio:
                astream = container.streams.audio[0]
                rate = astream.rate
                audio = [_to_mono(f) for f in container.decode(astream)]
                duration = astream.duration
                tb = astream.time_base
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"{path}: not a readable video file ({type(exc).__name__})") from None
    samples = np.concatenate(audio) if audio else np.zeros(0, dtype=np.float32)
    if audio and duration and tb:
        samples = samples[:int(round(duration * tb * rate))]
    video = np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)
    return video, samples, fps, rate
