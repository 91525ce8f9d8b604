"""Streaming audio conditions: the 3-second window per chunk and the feature extractors.

Audio features for chunk k come from a window covering [k-2, k+1) seconds: 2 s of history and the
1 s of the chunk itself, advancing 1 s per chunk (`StreamingAudioWindow`). An extractor turns a
window into one feature vector per *video* frame (`AudioFeatureExtractor`), because the DiT's audio
cross-attention is windowed per video frame:

- `LogMelAudioEncoder`: built in, runs anywhere: a log-mel spectrogram (80 mels, 25 ms / 10 ms),
  resampled to the video frame rate, optionally with causal loudness envelopes (how loud the
  stream was over the last fraction of a second, a few time constants), then a small learned
  temporal conv + projection.
- `Wav2Vec2AudioEncoder`: real wav2vec2 weights from a directory (Hugging Face layout), hidden
  states of chosen layers (averaged or concatenated), resampled from 50 Hz to the video rate, then
  a learned projection. Only the projection is LiveStage's own weights (see the class).

`AudioConditioner` ties the two together for one chunk: speak and listen windows in, features of
the whole window out, plus where the current chunk's frames sit inside it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from livestage.models.config import ChunkConfig, ModelPreset


class AudioFeatureExtractor(Protocol):
    """Anything that turns mono audio windows into one feature vector per video frame."""

    sample_rate: int
    feature_dim: int
    fps: int

    def extract(self, window: torch.Tensor) -> torch.Tensor:
        """Mono windows [B, samples] -> features [B, frames, feature_dim] at `fps`."""
        ...


def frames_in(samples: int, sample_rate: int, fps: int) -> int:
    """Video frames spanned by `samples` audio samples (3 s at 24 fps -> 72)."""
    return int(round(samples / sample_rate * fps))


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, fmin: float = 0.0,
                   fmax: float | None = None) -> torch.Tensor:
    """Triangular mel filters [n_mels, n_fft//2 + 1] (HTK mel scale), area-normalised.

    Computed here rather than taken from an audio library so the built-in encoder has no
    dependency beyond torch and numpy; area normalisation keeps every band's energy on a
    comparable scale whatever its width.
    """
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
    """Linear interpolation in time of [B, T, D] features to `frames` frames.

    Both audio frame rates (100 Hz mels, 50 Hz wav2vec2) are higher than the video rate and not
    integer multiples of it, so linear interpolation (not striding) keeps frame i centred on
    the audio around i/fps.
    """
    if x.shape[1] == frames:
        return x
    return F.interpolate(x.transpose(1, 2), size=frames, mode="linear", align_corners=False).transpose(1, 2)


def _as_batch(window: torch.Tensor | np.ndarray) -> torch.Tensor:
    """[samples] or [B, samples] (tensor or array) -> [B, samples]."""
    x = torch.as_tensor(window)
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise ValueError(f"audio windows must be [samples] or [B, samples], got shape {tuple(x.shape)}")
    return x


class LogMelAudioEncoder(nn.Module):
    """Log-mel features at the video rate with a small learned projection.

    Parameter names (`norm.*`, `temporal.*`, `proj.*`) are part of the checkpoint format
    (`audio_encoder.safetensors`); the filterbank and STFT window are recomputed, not stored.
    """

    def __init__(self, feature_dim: int, fps: int, sample_rate: int = 16000, n_mels: int = 80,
                 envelope_seconds: Sequence[float] = ()):
        super().__init__()
        if feature_dim < 1 or fps < 1 or sample_rate < 1 or n_mels < 1:
            raise ValueError("feature_dim, fps, sample_rate and n_mels must be positive")
        if any(not 0 < s <= 10 for s in envelope_seconds):
            raise ValueError(f"envelope_seconds must lie in (0, 10], got {tuple(envelope_seconds)}")
        self.envelope_seconds = tuple(float(s) for s in envelope_seconds)
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
        self.temporal = nn.Conv1d(n_mels + len(self.envelope_seconds), feature_dim, kernel_size=5, padding=2)
        self.proj = nn.Linear(feature_dim, feature_dim)

    @classmethod
    def for_preset(cls, preset: "ModelPreset") -> "LogMelAudioEncoder":
        """The extractor a preset's weights were made with (feature size, rate, envelopes)."""
        return cls(preset.dit.audio_dim, preset.chunk.fps, preset.chunk.sample_rate,
                   envelope_seconds=preset.audio_envelope_seconds)

    LOG_FLOOR = 1e-6
    """Added to powers before their log (silence is log(1e-6), not -inf)."""

    def mel_power(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, samples] -> mel band power [B, frames_10ms, n_mels] (always computed in float32)."""
        spec = torch.stft(audio.float(), n_fft=self.n_fft, hop_length=self.hop, win_length=self.win,
                          window=self.window.float(), center=True, return_complex=True)
        power = spec.abs().pow(2)  # [B, freq, T]
        return torch.einsum("mf,bft->btm", self.mel.float(), power)

    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, samples] -> log-mel [B, frames_10ms, n_mels] (always computed in float32)."""
        return torch.log(self.mel_power(audio) + self.LOG_FLOOR)

    def loudness_envelopes(self, mel_power: torch.Tensor) -> torch.Tensor:
        """Mel power [B, T, n_mels] -> causal loudness envelopes [B, T, len(envelope_seconds)].

        Envelope j at frame t is the mean mel power over the window's frames up to t, weighted
        exp(-age / envelope_seconds[j]) (an exponential moving average that starts at the window's
        first frame), on a log scale mapped to about [-2, 2]. Why: the log-mel channels are
        layer-normalised per frame, which keeps the spectral shape but drops the loudness, and they
        are local (a 5-frame convolution); a listener's reaction to the *end* of the user's speech
        (a nod half a second into a pause) needs "the user was talking until a moment ago" to be
        readable at the frame itself. Computed from the same 3-s window in training and serving.
        """
        power = mel_power.float().mean(-1)  # [B, T]
        t = power.shape[1]
        age = torch.arange(t, device=power.device, dtype=torch.float32) * (self.hop / self.sample_rate)
        tau = torch.tensor(self.envelope_seconds, device=power.device, dtype=torch.float32)
        decay = torch.exp(-age[None, :] / tau[:, None])  # [E, T]: weight of a frame `age` old
        weighted = F.conv1d(F.pad(power[:, None, :], (t - 1, 0)), decay.flip(-1)[:, None, :])  # [B, E, T]
        total = decay.cumsum(-1)  # [E, T]: the weights that frame t has history for
        return ((torch.log(weighted / total + self.LOG_FLOOR) + 7.0) / 4.0).transpose(1, 2)

    def extract(self, window: torch.Tensor) -> torch.Tensor:
        """Mono windows [B, samples] -> [B, frames at fps, feature_dim]."""
        window = _as_batch(window).to(self.proj.weight.device)
        frames = frames_in(window.shape[-1], self.sample_rate, self.fps)
        power = self.mel_power(window)
        dtype = self.proj.weight.dtype
        x = self.norm(resample_frames(torch.log(power + self.LOG_FLOOR), frames).to(dtype))
        if self.envelope_seconds:
            envelopes = resample_frames(self.loudness_envelopes(power), frames)
            x = torch.cat([x, envelopes.to(dtype)], dim=-1)
        x = F.gelu(self.temporal(x.transpose(1, 2))).transpose(1, 2)
        return self.proj(x)

    forward = extract


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None


class Wav2Vec2AudioEncoder(nn.Module):
    """wav2vec2 hidden states (weights from a directory) resampled to the video rate + projection.

    The wav2vec2 backbone is frozen and deliberately *not* registered as a submodule: its weights
    come from the Hugging Face directory, which is their one source of truth. So `state_dict()`
    holds only LiveStage's learned projection (`proj.*`, what `audio_encoder.safetensors`
    stores), and a seeded initialisation of the encoder (which re-runs every submodule's
    `reset_parameters`) can never overwrite pretrained weights. Device and dtype moves
    (`.to()`, `.half()`...) still reach the backbone, and it stays in eval mode whatever
    `.train()` is called on the encoder, so features are deterministic.

    `layers` picks hidden states (0 = the CNN feature projection, i = after transformer layer i;
    negative indices count from the end); default: all. `reduce` averages them (`mean`, the
    projection input is `hidden_size`) or concatenates them (`concat`, `hidden_size * len(layers)`).
    Input normalisation follows the directory's `preprocessor_config.json` (`do_normalize`,
    default on) unless `normalize` is given.
    """

    def __init__(self, model_dir: str | Path, feature_dim: int, fps: int,
                 layers: Sequence[int] | None = None, sample_rate: int = 16000,
                 reduce: Literal["mean", "concat"] = "mean", normalize: bool | None = None):
        super().__init__()
        path = Path(model_dir)
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FileNotFoundError(f"wav2vec2 model directory not found or has no config.json: {path}")
        if not any((path / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
            raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in wav2vec2 directory {path}")
        if reduce not in ("mean", "concat"):
            raise ValueError(f"reduce must be 'mean' or 'concat', got {reduce!r}")
        preprocessor = path / "preprocessor_config.json"
        pre = _read_json(preprocessor) if preprocessor.is_file() else {}
        model_rate = int(pre.get("sampling_rate", 16000))
        if sample_rate != model_rate:
            raise ValueError(f"wav2vec2 model in {path} expects {model_rate} Hz audio, not {sample_rate} Hz")
        try:
            from transformers import Wav2Vec2Model
        except ImportError as exc:  # pragma: no cover - depends on the deployment image
            raise ImportError("the wav2vec2 audio encoder needs the 'transformers' package") from exc
        backbone = Wav2Vec2Model.from_pretrained(str(path), local_files_only=True).eval()
        backbone.requires_grad_(False)
        object.__setattr__(self, "_backbone", backbone)  # not a submodule: see the class docstring
        hidden = backbone.config.hidden_size
        n_states = backbone.config.num_hidden_layers + 1
        chosen = list(layers) if layers is not None else list(range(n_states))
        if not chosen:
            raise ValueError("layers must name at least one hidden state")
        for i in chosen:
            if not -n_states <= i < n_states:
                raise ValueError(f"layer {i} out of range: the model in {path} has hidden states "
                                 f"0..{n_states - 1}")
        self.layers = tuple(i % n_states for i in chosen)
        self.reduce = reduce
        self.normalize = bool(pre.get("do_normalize", True)) if normalize is None else normalize
        self.model_dir = path
        self.feature_dim = feature_dim
        self.fps = fps
        self.sample_rate = sample_rate
        in_dim = hidden * (len(self.layers) if reduce == "concat" else 1)
        self.proj = nn.Linear(in_dim, feature_dim)

    @property
    def backbone(self) -> nn.Module:
        """The frozen Hugging Face `Wav2Vec2Model`."""
        return self._backbone  # type: ignore[no-any-return]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "Wav2Vec2AudioEncoder":
        # `.to()`, `.cuda()`, `.half()` all go through `_apply`: carry the hidden backbone along.
        super()._apply(fn, recurse)
        self._backbone._apply(fn, recurse)
        return self

    def hidden_states(self, window: torch.Tensor) -> torch.Tensor:
        """[B, samples] -> reduced hidden states [B, ~50 Hz frames, in_dim] (no projection)."""
        ref = next(self._backbone.parameters())
        x = _as_batch(window).to(device=ref.device, dtype=torch.float32)
        if self.normalize:  # as Wav2Vec2FeatureExtractor(do_normalize=True): zero mean, unit variance
            x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-7)
        with torch.no_grad():
            out = self._backbone(x.to(ref.dtype), output_hidden_states=True)
        states = [out.hidden_states[i] for i in self.layers]
        return torch.cat(states, dim=-1) if self.reduce == "concat" else torch.stack(states).mean(0)

    def extract(self, window: torch.Tensor) -> torch.Tensor:
        """Mono windows [B, samples] at 16 kHz -> [B, frames at fps, feature_dim]."""
        window = _as_batch(window)
        frames = frames_in(window.shape[-1], self.sample_rate, self.fps)
        states = self.hidden_states(window)
        return self.proj(resample_frames(states.float(), frames).to(self.proj.weight.dtype))

    forward = extract


def _as_mono_float32(samples: torch.Tensor | np.ndarray) -> np.ndarray:
    """Mono float32 in [-1, 1] from float samples or integer PCM (int16 from a WebRTC track...).

    Integer PCM is scaled by its type's full range: pushing raw int16 as floats would feed the
    encoders values of +-32768 without any error.
    """
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu().numpy()
    arr = np.asarray(samples)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"audio must be mono 1-D samples, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        if info.min == 0:  # unsigned PCM (u8) is centred on half range
            arr = (arr.astype(np.float32) - (info.max + 1) / 2) / ((info.max + 1) / 2)
        else:
            arr = arr.astype(np.float32) / float(-info.min)
    else:
        arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError("audio samples contain NaN or infinity")
    return arr


class StreamingAudioWindow:
    """Mono samples of one stream, read as 3 s windows [k-2, k+1) s per chunk k.

    The timeline is the sample count: sample i plays at i / sample_rate seconds after the session
    start, so a producer that has nothing to say must push silence (or call `pad_to`) to keep
    later audio at the right time. Samples before t=0 and beyond what has arrived read as
    silence. Memory stays bounded: once chunk k plays, `trim_before(k)` forgets what no window of
    chunk >= k needs. Pushes are appended to a list and joined lazily at the next read, so a
    TTS reply pushed in many 20 ms frames costs linear, not quadratic, copying.
    """

    def __init__(self, sample_rate: int = 16000, chunk_seconds: float = 1.0, history_chunks: int = 2):
        if sample_rate < 1 or chunk_seconds <= 0 or history_chunks < 0:
            raise ValueError("sample_rate and chunk_seconds must be positive, history_chunks >= 0")
        self.sample_rate = sample_rate
        self.chunk_seconds = chunk_seconds
        self.chunk_samples = int(round(sample_rate * chunk_seconds))
        self.history_chunks = history_chunks
        self._buffer = np.zeros(0, dtype=np.float32)
        self._pending: list[np.ndarray] = []
        self._pending_size = 0
        self._origin = 0  # absolute sample index of _buffer[0]

    @classmethod
    def for_chunks(cls, chunk: "ChunkConfig") -> "StreamingAudioWindow":
        """A window shaped by a preset's chunking (rate, chunk length, history)."""
        return cls(sample_rate=chunk.sample_rate, chunk_seconds=chunk.chunk_seconds,
                   history_chunks=chunk.audio_history_chunks)

    def _flat(self) -> np.ndarray:
        if self._pending:
            self._buffer = np.concatenate([self._buffer, *self._pending])
            self._pending.clear()
            self._pending_size = 0
        return self._buffer

    @property
    def window_samples(self) -> int:
        """Samples in one window: history chunks + the current chunk."""
        return self.chunk_samples * (self.history_chunks + 1)

    @property
    def end_sample(self) -> int:
        """Absolute index one past the last sample received."""
        return self._origin + self._buffer.size + self._pending_size

    @property
    def origin(self) -> int:
        """Absolute index of the oldest sample still held (earlier ones were trimmed)."""
        return self._origin

    def samples_from(self, start_sample: int) -> np.ndarray:
        """A copy of the samples held from absolute index `start_sample` (>= `origin`) to the end."""
        buffer = self._flat()
        return buffer[max(start_sample - self._origin, 0):].copy()

    @property
    def buffered_samples(self) -> int:
        """Samples held in memory (bounded by `trim_before`)."""
        return self._buffer.size + self._pending_size

    @property
    def available_seconds(self) -> float:
        """Seconds of audio received since t=0 (including anything already trimmed)."""
        return self.end_sample / self.sample_rate

    def push(self, samples: np.ndarray | torch.Tensor) -> None:
        """Appends mono samples (float in [-1, 1], or integer PCM, which is scaled)."""
        arr = _as_mono_float32(samples)
        if arr.size:
            self._pending.append(arr.copy())
            self._pending_size += arr.size

    def restart_at(self, start_sample: int) -> None:
        """Forgets everything and continues the stream at absolute sample `start_sample` (a copy
        of a stream rebuilt mid-session on another worker): earlier samples read as silence."""
        self._buffer = np.zeros(0, dtype=np.float32)
        self._pending.clear()
        self._pending_size = 0
        self._origin = max(int(start_sample), 0)

    def pad_to(self, seconds: float) -> None:
        """Appends silence so that audio reaches `seconds` (no-op if it already does).

        Keeps the next push at the right time when a stream went quiet, e.g. after an interrupt
        cut the speech at a chunk boundary that is later than the audio received so far.
        """
        missing = int(round(seconds * self.sample_rate)) - self.end_sample
        if missing > 0:
            self.push(np.zeros(missing, dtype=np.float32))

    def _start(self, chunk_index: int) -> int:
        return (chunk_index - self.history_chunks) * self.chunk_samples

    def window_bounds(self, chunk_index: int) -> tuple[float, float]:
        """(start, end) seconds of chunk k's window: (k - history, k + 1) x chunk_seconds."""
        start = self._start(chunk_index)
        return start / self.sample_rate, (start + self.window_samples) / self.sample_rate

    def window(self, chunk_index: int) -> np.ndarray:
        """Samples of [k-2, k+1) s (float32 copy), zero-padded where nothing is (yet) known.

        Returns a numpy array because the runtime ships windows between processes as arrays;
        `window_tensor` gives the same as a tensor.
        """
        buffer = self._flat()
        start = self._start(chunk_index)
        end = start + self.window_samples
        out = np.zeros(self.window_samples, dtype=np.float32)
        lo = max(start, self._origin)
        hi = min(end, self.end_sample)
        if hi > lo:
            out[lo - start:hi - start] = buffer[lo - self._origin:hi - self._origin]
        return out

    def window_tensor(self, chunk_index: int) -> torch.Tensor:
        """`window(chunk_index)` as a float32 tensor [samples]."""
        return torch.from_numpy(self.window(chunk_index))

    def chunk_audio(self, chunk_index: int) -> np.ndarray:
        """The samples of chunk k alone (the 1 s that plays with its frames)."""
        return self.window(chunk_index)[-self.chunk_samples:]

    def drop_after(self, seconds: float) -> None:
        """Forgets queued audio after `seconds` (an interrupt drops the rest of the speech)."""
        buffer = self._flat()
        cut = int(round(seconds * self.sample_rate)) - self._origin
        if cut < buffer.size:
            self._buffer = buffer[:max(cut, 0)].copy()

    def trim_before(self, chunk_index: int) -> None:
        """Forgets samples no window of chunk >= `chunk_index` needs."""
        buffer = self._flat()
        drop = self._start(chunk_index) - self._origin
        if drop > 0:
            drop = min(drop, buffer.size)
            self._buffer = buffer[drop:].copy()  # a copy, so the dropped samples are freed
            self._origin += drop

    def rms(self, chunk_index: int) -> float:
        """Loudness of chunk k's own second (used to tell speech from silence)."""
        x = self.chunk_audio(chunk_index)
        return float(math.sqrt(float(np.mean(x * x)))) if x.size else 0.0


@dataclass(frozen=True)
class ChunkAudioFeatures:
    """Audio features of one chunk's window for both streams.

    `speak` and `listen` are [B, window_frames, D]: the whole window (history + current chunk),
    because the DiT's windowed audio attention lets a frame look a little into the past.
    `current` is the range of the current chunk's frames inside the window.
    """

    speak: torch.Tensor
    listen: torch.Tensor
    current: range

    @property
    def speak_current(self) -> torch.Tensor:
        return self.speak[:, self.current.start:self.current.stop]

    @property
    def listen_current(self) -> torch.Tensor:
        return self.listen[:, self.current.start:self.current.stop]


class AudioConditioner:
    """Speak + listen windows of one chunk -> features of the whole window, in one batched call."""

    def __init__(self, extractor: AudioFeatureExtractor, chunk_seconds: float = 1.0,
                 history_chunks: int = 2):
        self.extractor = extractor
        self.chunk_seconds = chunk_seconds
        self.history_chunks = history_chunks
        rate, fps = extractor.sample_rate, extractor.fps
        self.chunk_samples = int(round(rate * chunk_seconds))
        self.window_samples = self.chunk_samples * (history_chunks + 1)
        self.window_frames = frames_in(self.window_samples, rate, fps)
        self.chunk_frames = frames_in(self.chunk_samples, rate, fps)

    @classmethod
    def for_chunks(cls, extractor: AudioFeatureExtractor, chunk: "ChunkConfig") -> "AudioConditioner":
        return cls(extractor, chunk_seconds=chunk.chunk_seconds, history_chunks=chunk.audio_history_chunks)

    @property
    def current(self) -> range:
        """Frame indices of the current chunk inside a window (the last `chunk_frames`)."""
        return range(self.window_frames - self.chunk_frames, self.window_frames)

    def __call__(self, speak_window: torch.Tensor | np.ndarray,
                 listen_window: torch.Tensor | np.ndarray) -> ChunkAudioFeatures:
        """Windows [samples] or [B, samples] of both streams -> `ChunkAudioFeatures`."""
        speak, listen = _as_batch(speak_window).float(), _as_batch(listen_window).float()
        for name, w in (("speak", speak), ("listen", listen)):
            if w.shape[-1] != self.window_samples:
                raise ValueError(f"{name} window must hold {self.window_samples} samples, got {w.shape[-1]}")
        if speak.shape[0] != listen.shape[0]:
            raise ValueError(f"speak and listen batches differ: {speak.shape[0]} vs {listen.shape[0]}")
        feats = self.extractor.extract(torch.cat([speak, listen]))
        if feats.shape[1] != self.window_frames:
            raise ValueError(f"extractor gave {feats.shape[1]} frames, expected {self.window_frames}")
        b = speak.shape[0]
        return ChunkAudioFeatures(speak=feats[:b], listen=feats[b:], current=self.current)

    def for_chunk(self, chunk_index: int, speak: StreamingAudioWindow,
                  listen: StreamingAudioWindow) -> ChunkAudioFeatures:
        """Features of chunk k read straight from the two streams' buffers."""
        return self(speak.window_tensor(chunk_index), listen.window_tensor(chunk_index))
