"""Audio input: any container PyAV decodes, checked for rate, length and content; WAV output.

Decoding goes through libswresample (PyAV's `AudioResampler`) twice: once to turn whatever sample
format the codec produces (s16, s32, float, planar or packed...) into float32, and, when asked,
once to change the sample rate with a proper anti-aliasing filter, streaming, frame by frame.
"""

from __future__ import annotations

import wave
from pathlib import Path

import av
import numpy as np

from livestage.media.errors import MediaError


def _resampled(resampler: av.AudioResampler, frame: av.AudioFrame | None) -> list[np.ndarray]:
    return [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]


def resample_audio(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Mono float32 from one rate to another through libswresample's anti-aliasing filter
    (TTS voices speak at 22.05/24 kHz, the pipeline listens at 16 kHz). Output length is
    `round(n * rate_out / rate_in)` exactly, so consecutive pieces of a stream keep their timing."""
    arr = np.ascontiguousarray(np.asarray(samples, dtype=np.float32).reshape(-1))
    if rate_in < 1 or rate_out < 1:
        raise ValueError(f"sample rates must be positive, got {rate_in} -> {rate_out}")
    if rate_in == rate_out or arr.size == 0:
        return arr.copy()
    resampler = av.AudioResampler(format="fltp", layout="mono", rate=rate_out)
    frame = av.AudioFrame.from_ndarray(arr[None, :], format="fltp", layout="mono")
    frame.sample_rate = rate_in
    out = _resampled(resampler, frame) + _resampled(resampler, None)
    joined = np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros(0, np.float32)
    want = int(round(arr.size * rate_out / rate_in))
    if joined.size >= want:
        return joined[:want]
    return np.concatenate([joined, np.zeros(want - joined.size, np.float32)])


def load_audio(path: str | Path, expected_rate: int = 16000, resample: bool = False,
               max_seconds: float | None = None) -> np.ndarray:
    """Decodes an audio file (WAV, MP3, FLAC, OGG/Opus, M4A...) to mono float32 at `expected_rate`.

    A different sample rate is an error unless `resample=True`: silently resampling hides a
    misconfigured client. Channels are averaged to mono. `max_seconds` refuses longer audio
    while decoding, so an oversized upload is never held in memory. Every failure is a
    `MediaError` whose one-line message starts with the path.
    """
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: audio file not found")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: empty file (zero bytes), no audio")
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            streams = container.streams.audio
            if not streams:
                raise MediaError(f"{path}: not an audio file (no audio stream)")
            stream = streams[0]
            rate = stream.codec_context.sample_rate or stream.rate
            if not rate:
                raise MediaError(f"{path}: audio stream has no sample rate")
            if rate != expected_rate and not resample:
                raise MediaError(
                    f"{path}: sample rate is {rate} Hz, expected {expected_rate} Hz "
                    f"(convert it, or load with resample=True / --resample)"
                )
            to_float = av.AudioResampler(format="fltp")  # keeps the layout and the rate
            to_rate = (av.AudioResampler(format="fltp", layout="mono", rate=expected_rate)
                       if rate != expected_rate else None)
            limit = None if max_seconds is None else int(round(max_seconds * rate))
            total = 0
            for frame in container.decode(stream):
                for planar in to_float.resample(frame):
                    arr = planar.to_ndarray()  # [channels, samples] float32
                    mono = np.ascontiguousarray(arr.mean(axis=0, dtype=np.float32)[None, :])
                    total += mono.shape[1]
                    if limit is not None and total > limit:
                        raise MediaError(f"{path}: audio is longer than {max_seconds:g} s")
                    if to_rate is None:
                        chunks.append(mono[0])
                        continue
                    mframe = av.AudioFrame.from_ndarray(mono, format="fltp", layout="mono")
                    mframe.sample_rate = rate
                    chunks.extend(_resampled(to_rate, mframe))
            if to_rate is not None:
                chunks.extend(_resampled(to_rate, None))  # the filter's tail
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"{path}: not a readable audio file ({type(exc).__name__})") from None
    samples = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    if samples.size == 0:
        raise MediaError(f"{path}: no audio samples (zero-length audio)")
    if not np.isfinite(samples).all():
        raise MediaError(f"{path}: audio contains NaN or infinite samples")
    return samples


def write_wav(path: str | Path, samples: np.ndarray, rate: int = 16000, channels: int | None = None) -> None:
    """Writes 16-bit PCM WAV; samples are float in [-1, 1] (clipped).

    `samples` is mono [n], or [n, channels]; a 1-D array with `channels > 1` is taken as
    interleaved frames.
    """
    arr = np.asarray(samples, dtype=np.float32)
    if arr.ndim == 2:
        if channels is not None and channels != arr.shape[1]:
            raise ValueError(f"samples have {arr.shape[1]} channels, channels={channels}")
        channels = arr.shape[1]
    elif arr.ndim != 1:
        raise ValueError(f"samples must be [n] or [n, channels], got shape {arr.shape}")
    channels = channels or 1
    if arr.size % channels:
        raise ValueError(f"{arr.size} interleaved samples do not divide into {channels} channels")
    if rate < 1:
        raise ValueError(f"sample rate must be positive, got {rate}")
    pcm = np.round(np.clip(arr.reshape(-1), -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
