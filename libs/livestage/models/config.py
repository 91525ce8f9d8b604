"""Model configuration and the size presets (`tiny`, `demo`, `wan-1.3b`, `lpm-14b`).

One `ModelPreset` describes everything needed to build the streaming avatar model: the DiT layout
(Wan2.1 names and sizes), the chunking of time, the attention window, the sampler schedule, the
VAE and the condition encoders. Presets are plain data so services, the Triton repository
generator and the benchmarks all build exactly the same thing from a name.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from livestage.models.vae import VAEConfig

REFERENCE_KINDS: tuple[str, ...] = ("global", "view", "expression")
"""Reference image kinds, in the order of their RoPE base offsets and type embeddings."""

MAX_REFERENCES: dict[str, int] = {"global": 1, "view": 4, "expression": 8}


@dataclass(frozen=True)
class DiTConfig:
    """Sizes of the Wan2.1-style DiT plus LiveStage's extra condition modules.

    The first block of fields mirrors the constructor arguments of the reference `WanModel`, so a
    Wan checkpoint's config maps onto it one to one. `audio_dim == 0` and `references == False`
    give the plain Wan2.1 T2V model (what the parity cases exercise).
    """

    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 12
    num_layers: int = 30
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    # LiveStage extras ------------------------------------------------------------------------
    audio_dim: int = 0
    """Feature size of the speak/listen audio features; 0 disables audio cross-attention."""
    speak_window: int = 2
    """Speak attention sees audio frames within +-speak_window video frames of each latent frame."""
    listen_window: int = 12
    """Listen attention sees a wider +-listen_window video frames."""
    references: bool = False
    """Whether reference-image tokens (global/views/expressions) are supported."""
    reference_base_offsets: tuple[int, int, int] = (4, 8, 16)
    """RoPE temporal offset of each reference kind, counted after the end of the attention window."""
    reference_sub_offset: int = 1
    """Extra temporal offset between two images of the same kind."""
    rope_max_positions: int = 1024
    """Length of the RoPE frequency table (as in Wan); the pre-RoPE cache keeps positions below it."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_reference(cls, cfg: dict[str, Any]) -> "DiTConfig":
        """Builds a config from the reference `WanModel` constructor arguments (as in parity files)."""
        known = {f.name for f in dataclasses.fields(cls)}
        ignored = {"model_type"}
        unknown = sorted(set(cfg) - known - ignored)
        if unknown:
            raise ValueError(f"unknown DiT config keys: {', '.join(unknown)}")
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in known}
        return cls(**values)

    def validate(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.audio_dim and self.num_layers < 2:
            raise ValueError("audio conditioning needs at least 2 layers (speak even, listen odd)")


@dataclass(frozen=True)
class ChunkConfig:
    """How time is cut into chunks and how much history the causal attention keeps."""

    fps: int = 24
    chunk_seconds: float = 1.0
    latent_frames_per_chunk: int = 6
    sink_chunks: int = 3
    window_chunks: int = 2
    audio_history_chunks: int = 2
    sample_rate: int = 16000

    @property
    def frames_per_chunk(self) -> int:
        return int(round(self.fps * self.chunk_seconds))

    @property
    def samples_per_chunk(self) -> int:
        return int(round(self.sample_rate * self.chunk_seconds))

    @property
    def audio_window_frames(self) -> int:
        """Video frames covered by one audio window (history + current chunk)."""
        return self.frames_per_chunk * (self.audio_history_chunks + 1)

    @property
    def max_cached_chunks(self) -> int:
        return self.sink_chunks + self.window_chunks

    def validate(self, temporal_factor: int) -> None:
        if self.frames_per_chunk != self.latent_frames_per_chunk * temporal_factor:
            raise ValueError(
                f"fps*chunk_seconds = {self.frames_per_chunk} frames must equal "
                f"latent_frames_per_chunk ({self.latent_frames_per_chunk}) x VAE temporal factor "
                f"({temporal_factor})"
            )
        if self.sink_chunks < 0 or self.window_chunks < 0:
            raise ValueError("sink_chunks and window_chunks must be >= 0")


@dataclass(frozen=True)
class SamplerConfig:
    """Few-step flow-matching schedule of the backbone (2 steps) and the refiner (1 step).

    Timesteps are on the 0..1000 training scale and warped by `shift` as in Wan/Self-Forcing
    (sigma' = shift*sigma / (1 + (shift-1)*sigma)). Between steps the predicted clean latent is
    re-noised with fresh Gaussian noise (DMD-style sampling).
    """

    backbone_timesteps: tuple[float, ...] = (1000.0, 750.0)
    refiner_timestep: float = 500.0
    shift: float = 5.0
    num_train_timesteps: int = 1000
    backbone_history: str = "last_step"
    """How the backbone's noisy-history K/V are written: from the last denoising step's input
    (a re-noised latent of its own output; costs nothing extra)."""
    refiner_history_timestep: float = 0.0
    """The refiner's clean-history K/V come from an extra pass on the refined latent at this t."""


@dataclass(frozen=True)
class ModelPreset:
    """Everything needed to build one streaming avatar model."""

    name: str
    dit: DiTConfig
    vae: VAEConfig
    chunk: ChunkConfig
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    height: int = 512
    width: int = 512
    text_max_tokens: int = 16
    text_vocab_size: int = 4096
    audio_encoder: str = "logmel"
    """`logmel` (built-in, runs anywhere) or `wav2vec2` (real weights from a path)."""
    audio_envelope_seconds: tuple[float, ...] = ()
    """`logmel` only: time constants of the causal loudness envelopes added to the log-mel
    channels (`LogMelAudioEncoder.loudness_envelopes`); part of the audio encoder's weight shape."""

    @property
    def latent_height(self) -> int:
        return self.height // self.vae.spatial_factor

    @property
    def latent_width(self) -> int:
        return self.width // self.vae.spatial_factor

    @property
    def tokens_per_latent_frame(self) -> int:
        _, ph, pw = self.dit.patch_size
        return (self.latent_height // ph) * (self.latent_width // pw)

    @property
    def tokens_per_chunk(self) -> int:
        return self.tokens_per_latent_frame * self.chunk.latent_frames_per_chunk

    def validate(self) -> "ModelPreset":
        self.dit.validate()
        self.chunk.validate(self.vae.temporal_factor)
        step = self.vae.spatial_factor * self.dit.patch_size[1]
        if self.height % step or self.width % step:
            raise ValueError(f"height/width ({self.height}x{self.width}) must be multiples of {step}")
        if self.dit.in_dim != self.vae.z_dim or self.dit.out_dim != self.vae.z_dim:
            raise ValueError("DiT in_dim/out_dim must equal the VAE latent channels")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def replace(self, **changes: Any) -> "ModelPreset":
        return dataclasses.replace(self, **changes).validate()


def _tiny() -> ModelPreset:
    return ModelPreset(
        name="tiny",
        dit=DiTConfig(
            text_len=8, dim=32, ffn_dim=64, freq_dim=32, text_dim=32, num_heads=2, num_layers=2,
            audio_dim=16, references=True, speak_window=1, listen_window=4,
        ),
        vae=VAEConfig(dim=8, z_dim=16, num_res_blocks=1),
        chunk=ChunkConfig(fps=8, latent_frames_per_chunk=2),
        height=32, width=32, text_max_tokens=8, text_vocab_size=256,
        audio_envelope_seconds=(0.1, 0.4, 1.0, 2.0),  # tests train and stream with them (demo: none, docs/training.md)
    )


def _demo() -> ModelPreset:
    return ModelPreset(
        name="demo",
        dit=DiTConfig(
            text_len=16, dim=128, ffn_dim=384, freq_dim=64, text_dim=64, num_heads=2, num_layers=4,
            audio_dim=32, references=True, speak_window=2, listen_window=12,
        ),
        # Sized for real time on 2 CPU cores at 128x128, 24 fps (see docs/model.md, make bench).
        vae=VAEConfig(dim=8, z_dim=16, num_res_blocks=1, decoder_res_blocks=1),
        chunk=ChunkConfig(fps=24, latent_frames_per_chunk=6),
        height=128, width=128, text_max_tokens=16, text_vocab_size=4096,
    )


def _wan_1_3b() -> ModelPreset:
    return ModelPreset(
        name="wan-1.3b",
        dit=DiTConfig(
            text_len=512, dim=1536, ffn_dim=8960, freq_dim=256, text_dim=4096, num_heads=12,
            num_layers=30, audio_dim=768, references=True,
        ),
        vae=VAEConfig(),
        chunk=ChunkConfig(fps=24, latent_frames_per_chunk=6),
        height=512, width=512, text_max_tokens=64, text_vocab_size=32768, audio_encoder="logmel",
    )


def _lpm_14b() -> ModelPreset:
    return ModelPreset(
        name="lpm-14b",
        dit=DiTConfig(
            text_len=512, dim=5120, ffn_dim=13824, freq_dim=256, text_dim=4096, num_heads=40,
            num_layers=40, audio_dim=1024, references=True,
        ),
        vae=VAEConfig(),
        chunk=ChunkConfig(fps=24, latent_frames_per_chunk=6),
        height=720, width=400, text_max_tokens=64, text_vocab_size=32768, audio_encoder="logmel",
    )


_PRESETS = {"tiny": _tiny, "demo": _demo, "wan-1.3b": _wan_1_3b, "lpm-14b": _lpm_14b}
PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)


def get_preset(name: str) -> ModelPreset:
    """Returns the named preset, validated; unknown names list the valid ones."""
    try:
        factory = _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}") from None
    return factory().validate()
