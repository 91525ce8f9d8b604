"""Streaming audio conditions: the 3-second window per chunk and the feature extractors.

Audio features for chunk k come from a window covering [k-2, k+1) seconds: 2 s of history and the
1 s of the chunk itself, advancing 1 s per chunk (`StreamingAudioWindow`). An extractor turns a
window into one feature vector per *video* frame (`AudioFeatureExtractor`), because the DiT's audio
cross-attention is windowed per video frame:

- `LogMelAudioEncoder`: built in, runs anywhere: a log-mel spectrogram (80 mels, 25 ms / 10 ms),
  resampled to the video frame rate, then a small learned temporal conv + projection.
- `Wav2Vec2AudioEncoder`: real wav2vec2 weights from a directory (Hugging Face layout), hidden
  states averaged over chosen layers, resampled from 50 Hz to the video rate, then projected.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from livestage.models.config import ChunkConfig


class AudioFeatureExtractor(Protocol):
    sample_rate: int
    feature_dim: int
    fps: int

    def extract(self, window: torch.Tensor) -> torch.Tensor:
        """Mono windows [B, samples] -> features [B, frames, feature_dim] at `fps`."""
        ...


def frames_in(samples: int, sample_rate: int, fps: int) -> int:
    return int(round(samples / sample_rate * fps))


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, fmin: float = 0.0,
                   fmax: float | None = None) -> torch.Tensor:
    """Triangular mel filters [n_mels, n_fft//2 + 1] (HTK mel scale), area-normalised."""
    fmax = fmax or sample_rate / 2

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    mels = np.linspace(hz_to_mel(np.array(fmin)), hz_to_mel(np.array(fmax)), n_mels + 2)
    hz = mel_to_hz(mels)
    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    fb = np.zeros((n_mels, bins.size))
    for i in range(n_mels):
        lo, mid, hi = hz[i], hz[i + 1], hz[i + 2]
        up = (bins - lo) / max(mid - lo, 1e-9)
        down = (hi - bins) / max(hi - mid, 1e-9)
        fb[i] = np.clip(np.minimum(up, down), 0, None)
        fb[i] *= 2.0 / max(hi - lo, 1e-9)
    return torch.tensor(fb, dtype=torch.float32)


def resample_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Linear interpolation in time of [B, T, D] features to `frames` frames."""
    if x.shape[1] == frames:
        return x
    return F.interpolate(x.transpose(1, 2), size=frames, mode="linear", align_corners=False).transpose(1, 2)


class LogMelAudioEncoder(nn.Module):
    """Log-mel features at the video rate with a small learned projection (parameter names stable)."""

    def __init__(self, feature_dim: int, fps: int, sample_rate: int = 16000, n_mels: int = 80):
        super().__init__()
        self.feature_dim = feature_dim
        self.fps = fps
        self.sample_rate = sample_rate
        self.n_mels = n_mels
        self.win = int(0.025 * sample_rate)
        self.hop = int(0.010 * sample_rate)
        self.n_fft = 1 << (self.win - 1).bit_length()
        self.register_buffer("mel", mel_filterbank(n_mels, self.n_fft, sample_rate), persistent=False)
        self.register_buffer("window", torch.hann_window(self.win), persistent=False)
        self.norm = nn.LayerNorm(n_mels)
        self.temporal = nn.Conv1d(n_mels, feature_dim, kernel_size=5, padding=2)
        self.proj = nn.Linear(feature_dim, feature_dim)

    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, samples] -> log-mel [B, frames_10ms, n_mels]."""
        spec = torch.stft(audio.float(), n_fft=self.n_fft, hop_length=self.hop, win_length=self.win,
                          window=self.window.float(), center=True, return_complex=True)
        power = spec.abs().pow(2)  # [B, freq, T]
        mel = torch.einsum("mf,bft->btm", self.mel.float(), power)
        return torch.log(mel + 1e-6)

    def extract(self, window: torch.Tensor) -> torch.Tensor:
        if window.dim() == 1:
            window = window.unsqueeze(0)
        frames = frames_in(window.shape[-1], self.sample_rate, self.fps)
        mel = resample_frames(self.log_mel(window), frames)
        dtype = self.proj.weight.dtype
        x = self.norm(mel.to(dtype))
        x = F.gelu(self.temporal(x.transpose(1, 2))).transpose(1, 2)
        return self.proj(x)

    forward = extract


class Wav2Vec2AudioEncoder(nn.Module):
    """wav2vec2 hidden states (weights from a directory) resampled to the video rate + projection."""

    def __init__(self, model_dir: str | Path, feature_dim: int, fps: int,
                 layers: Sequence[int] | None = None, sample_rate: int = 16000):
        super().__init__()
        path = Path(model_dir)
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FileNotFoundError(f"wav2vec2 model directory not found or has no config.json: {path}")
        if not any((path / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
            raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")
        try:
            from transformers import Wav2Vec2Model
        except ImportError as exc:  # pragma: no cover - depends on the deployment image
            raise RuntimeError("the wav2vec2 audio encoder needs the 'transformers' package") from exc
        self.backbone = Wav2Vec2Model.from_pretrained(str(path), local_files_only=True).eval()
        hidden = self.backbone.config.hidden_size
        n_layers = self.backbone.config.num_hidden_layers
        self.layers = tuple(layers) if layers is not None else tuple(range(n_layers + 1))
        self.feature_dim = feature_dim
        self.fps = fps
        self.sample_rate = sample_rate
        self.proj = nn.Linear(hidden, feature_dim)

    def extract(self, window: torch.Tensor) -> torch.Tensor:
        if window.dim() == 1:
            window = window.unsqueeze(0)
        frames = frames_in(window.shape[-1], self.sample_rate, self.fps)
        x = window.float()
        x = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-7)
        with torch.no_grad():
            out = self.backbone(x, output_hidden_states=True)
        states = torch.stack([out.hidden_states[i] for i in self.layers]).mean(0)
        return self.proj(resample_frames(states, frames).to(self.proj.weight.dtype))

    forward = extract


class StreamingAudioWindow:
    """Mono samples of one stream, read as 3 s windows [k-2, k+1) s per chunk k.

    Samples before t=0 and beyond what has arrived read as silence. Memory stays bounded: once
    chunk k plays, `trim_before(k)` forgets what no later window needs.
    """

    def __init__(self, sample_rate: int = 16000, chunk_seconds: float = 1.0, history_chunks: int = 2):
        self.sample_rate = sample_rate
        self.chunk_samples = int(round(sample_rate * chunk_seconds))
        self.history_chunks = history_chunks
        self._buffer = np.zeros(0, dtype=np.float32)
        self._origin = 0  # absolute sample index of _buffer[0]

    @classmethod
    def for_chunks(cls, chunk: "ChunkConfig") -> "StreamingAudioWindow":
        """A window shaped by a preset's chunking (rate, chunk length, history)."""
        return cls(sample_rate=chunk.sample_rate, chunk_seconds=chunk.chunk_seconds,
                   history_chunks=chunk.audio_history_chunks)

    @property
    def window_samples(self) -> int:
        return self.chunk_samples * (self.history_chunks + 1)

    @property
    def end_sample(self) -> int:
        return self._origin + self._buffer.size

    @property
    def available_seconds(self) -> float:
        return self.end_sample / self.sample_rate

    def push(self, samples: np.ndarray | torch.Tensor) -> None:
        arr = np.asarray(samples.detach().cpu() if isinstance(samples, torch.Tensor) else samples,
                         dtype=np.float32)
        if arr.ndim != 1:
            raise ValueError(f"audio must be mono 1-D samples, got shape {arr.shape}")
        self._buffer = np.concatenate([self._buffer, arr])

    def window_bounds(self, chunk_index: int) -> tuple[float, float]:
        start = (chunk_index - self.history_chunks) * self.chunk_samples
        return start / self.sample_rate, (start + self.window_samples) / self.sample_rate

    def window(self, chunk_index: int) -> np.ndarray:
        """Samples of [k-2, k+1) s, zero-padded where nothing is (yet) known."""
        start = (chunk_index - self.history_chunks) * self.chunk_samples
        end = start + self.window_samples
        out = np.zeros(self.window_samples, dtype=np.float32)
        lo = max(start, self._origin)
        hi = min(end, self.end_sample)
        if hi > lo:
            out[lo - start:hi - start] = self._buffer[lo - self._origin:hi - self._origin]
        return out

    def chunk_audio(self, chunk_index: int) -> np.ndarray:
        """The samples of chunk k alone (the 1 s that plays with its frames)."""
        return self.window(chunk_index)[-self.chunk_samples:]

    def drop_after(self, seconds: float) -> None:
        """Forgets queued audio after `seconds` (an interrupt drops the rest of the speech)."""
        cut = int(round(seconds * self.sample_rate)) - self._origin
        if cut < self._buffer.size:
            self._buffer = self._buffer[:max(cut, 0)]

    def trim_before(self, chunk_index: int) -> None:
        """Forgets samples no window of chunk >= `chunk_index` needs."""
        keep_from = (chunk_index - self.history_chunks) * self.chunk_samples
        drop = keep_from - self._origin
        if drop > 0:
            drop = min(drop, self._buffer.size)
            self._buffer = self._buffer[drop:]
            self._origin += drop

    def rms(self, chunk_index: int) -> float:
        x = self.chunk_audio(chunk_index)
        return float(math.sqrt(float(np.mean(x * x)))) if x.size else 0.0
