"""Audio input: any container PyAV decodes, checked for rate, length and content; WAV output."""

from __future__ import annotations

import wave
from pathlib import Path

import av
import numpy as np

from livestage.media.errors import MediaError


def _resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target or samples.size == 0:
        return samples
    n = int(round(samples.size * target / rate))
    x_old = np.arange(samples.size) / rate
    x_new = np.arange(n) / target
    return np.interp(x_new, x_old, samples).astype(np.float32)


def load_audio(path: str | Path, expected_rate: int = 16000, resample: bool = False,
               max_seconds: float | None = None) -> np.ndarray:
    """Decodes an audio file to mono float32 at `expected_rate`.

    A different sample rate is an error unless `resample=True`: silently resampling hides a
    misconfigured client. Stereo is averaged to mono.
    """
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: audio file not found")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: empty file, no audio")
    try:
        with av.open(str(path)) as container:
            streams = container.streams.audio
            if not streams:
                raise MediaError(f"{path}: not an audio file (no audio stream)")
            stream = streams[0]
            rate = stream.codec_context.sample_rate or stream.rate
            if rate != expected_rate and not resample:
                raise MediaError(
                    f"{path}: sample rate is {rate} Hz, expected {expected_rate} Hz "
                    f"(convert it, or pass --resample)"
                )
            chunks = []
            total = 0
            limit = None if max_seconds is None else int(max_seconds * rate)
            for frame in container.decode(stream):
                arr = frame.to_ndarray().astype(np.float32)
                if frame.format.name.startswith("s16"):
                    arr /= 32768.0
                elif frame.format.name.startswith("s32"):
                    arr /= 2147483648.0
                elif frame.format.name.startswith("u8"):
                    arr = (arr - 128.0) / 128.0
                channels = len(frame.layout.channels)
                if frame.format.is_planar:
                    mono = arr.reshape(channels, -1).mean(axis=0)
                else:
                    mono = arr.reshape(-1, channels).mean(axis=1)
                chunks.append(mono)
                total += mono.size
                if limit is not None and total > limit:
                    raise MediaError(f"{path}: audio is longer than {max_seconds:g} s")
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"{path}: not a readable audio file ({type(exc).__name__})") from None
    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    if samples.size == 0:
        raise MediaError(f"{path}: no audio samples (zero-length audio)")
    if not np.isfinite(samples).all():
        raise MediaError(f"{path}: audio contains NaN or infinite samples")
    return _resample(samples, rate, expected_rate)


def write_wav(path: str | Path, samples: np.ndarray, rate: int = 16000, channels: int = 1) -> None:
    """16-bit PCM WAV (interleaved if channels > 1)."""
    pcm = (np.clip(np.asarray(samples, dtype=np.float32), -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
