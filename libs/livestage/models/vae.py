"""The causal 3D video VAE in the Wan2.1 layout, with streaming decode.

Layout (Wan2.1 `WanVAE_` parameter names, so a Wan checkpoint loads with strict keys): an encoder
of causal 3D convolutions that compresses 4x in time and 8x in space to `z_dim` latent channels
(posterior mean and log-variance; we use the mean), 1x1x1 `conv1`/`conv2` around the latent, and
a mirrored decoder. Every 3x3x3 convolution is *causal in time*: it only looks at the current and
the two previous frames, so decoding can run chunk by chunk with a per-session cache that holds
the last two input frames of each convolution (`VAEDecodeState`).

Time structure, as in the reference: the first frame of a stream is encoded alone and becomes one
latent; every later group of 4 frames becomes one latent. Decoding mirrors it: the first latent of
a session gives 1 frame, every later latent 4 frames. The temporal upsampler is not applied to the
very first latent, and its causal context starts from zeros at the second latent; streaming keeps
exactly those semantics, so decoding in chunks equals decoding all latents at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

# Published per-channel latent statistics of the Wan2.1 VAE (z_dim 16).
WAN21_LATENT_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENT_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

TAIL_FRAMES = 2  # causal context of a 3-frame temporal kernel


@dataclass(frozen=True)
class VAEConfig:
    """Constructor arguments of the Wan2.1 VAE (names as in the reference)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    decoder_res_blocks: int | None = None
    """LiveStage extension: residual blocks per decoder stage. None keeps Wan's layout
    (num_res_blocks + 1); the CPU `demo` preset uses 1 to decode in real time."""

    @classmethod
    def from_reference(cls, cfg: dict[str, Any]) -> "VAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown VAE config keys: {', '.join(unknown)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()})

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


class _StreamCache:
    """Per-call mapping from causal conv id to its cached tail (last input frames)."""

    def __init__(self) -> None:
        self.tails: dict[int, Any] = {}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tails.values()
                   if isinstance(t, torch.Tensor))


@dataclass
class VAEDecodeState:
    """Per-session streaming decode cache: conv tails and how many latents were decoded."""

    cache: _StreamCache = field(default_factory=_StreamCache)
    num_latents_decoded: int = 0

    def nbytes(self) -> int:
        return self.cache.nbytes()


class CausalConv3d(nn.Conv3d):
    """3D convolution padded only on the past side in time (and symmetrically in space).

    Streaming: with a cache, the previous call's last input frames replace the zero padding.
    """

    stream_id: int = -1

    def __init__(self, in_dim: int, out_dim: int, kernel: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0):
        p = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        # Spatial padding is symmetric: let the convolution do it (no padded copy); temporal
        # padding is causal and comes from the cached tail (or zeros).
        super().__init__(in_dim, out_dim, kernel, stride=stride, padding=(0, p[1], p[2]))
        self.time_pad = 2 * p[0]
        self.pointwise = self.kernel_size == (1, 1, 1) and self.stride == (1, 1, 1)

    def forward(self, x: torch.Tensor, cache: _StreamCache | None = None) -> torch.Tensor:
        if self.time_pad:
            tail = cache.tails.get(self.stream_id) if cache is not None else None
            if tail is None:
                tail = x.new_zeros(*x.shape[:2], self.time_pad, *x.shape[3:])
            x = torch.cat([tail.to(x.dtype), x], dim=2)
            if cache is not None:
                cache.tails[self.stream_id] = x[:, :, -self.time_pad:].detach().clone()
        if self.pointwise:
            # A 1x1x1 convolution is a channel matmul; the generic Conv3d path is much slower.
            y = torch.einsum("oc,bcthw->bothw", self.weight[:, :, 0, 0, 0], x)
            return y + self.bias.view(1, -1, 1, 1, 1) if self.bias is not None else y
        return super().forward(x)


class ChannelRMSNorm(nn.Module):
    """L2-normalises over channels, rescaled by sqrt(C) and a learned per-channel `gamma`."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x / max(||x||, 1e-12) as the reference's F.normalize, written with a sum of squares:
        # PyTorch's channel-dim vector_norm kernel is ~10x slower on CPU for video tensors.
        inv = x.square().sum(dim=1, keepdim=True).clamp_min(1e-24).rsqrt()
        return x * inv * (self.scale * self.gamma)


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Applies a 2D module to every frame of [B, C, T, H, W]."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


class _NearestUpsample2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)


class Resample(nn.Module):
    """Spatial (and optionally temporal) 2x down- or up-sampling between VAE stages."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(_NearestUpsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def forward(self, x: torch.Tensor, cache: _StreamCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._time_upsample(x, cache)
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._time_downsample(x, cache)
        return x

    def _time_upsample(self, x: torch.Tensor, cache: _StreamCache) -> torch.Tensor:
        key = self.time_conv.stream_id
        if key not in cache.tails:
            # The first latent of a stream becomes a single frame: no temporal upsampling, and
            # the next latents start their temporal context from zeros, as in the reference.
            cache.tails[key] = None
            if x.shape[2] == 1:
                return x
            first, x = x[:, :, :1], x[:, :, 1:]
            return torch.cat([first, self._time_upsample(x, cache)], dim=2)
        b, c, t, h, w = x.shape
        y = self.time_conv(x, cache)  # [B, 2C, T, H, W]: two output frames per input frame
        return y.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)

    def _time_downsample(self, x: torch.Tensor, cache: _StreamCache) -> torch.Tensor:
        key = self.time_conv.stream_id
        prev = cache.tails.get(key)
        if prev is None:
            # The first frame of a stream passes alone; later frames pair with the previous one.
            cache.tails[key] = x[:, :, -1:].detach().clone()
            if x.shape[2] == 1:
                return x
            first, rest = x[:, :, :1], x[:, :, 1:]
            return torch.cat([first, self._time_downsample(rest, cache)], dim=2)
        cache.tails[key] = x[:, :, -1:].detach().clone()
        return self.time_conv(torch.cat([prev.to(x.dtype), x], dim=2))


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(
            ChannelRMSNorm(in_dim, images=False), nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            ChannelRMSNorm(out_dim, images=False), nn.SiLU(), nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: _StreamCache) -> torch.Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention within each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = ChannelRMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: _StreamCache | None = None) -> torch.Tensor:
        def frame_attention(f: torch.Tensor) -> torch.Tensor:
            n, c, h, w = f.shape
            qkv = self.to_qkv(self.norm(f)).reshape(n, 1, 3 * c, h * w).transpose(2, 3)
            q, k, v = qkv.chunk(3, dim=-1)
            out = F.scaled_dot_product_attention(q, k, v)
            return self.proj(out.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

        return x + _per_frame(frame_attention, x)


def _run(layer: nn.Module, x: torch.Tensor, cache: _StreamCache) -> torch.Tensor:
    if isinstance(layer, (ResidualBlock, Resample, AttentionBlock, CausalConv3d)):
        return layer(x, cache)
    return layer(x)


class Encoder3d(nn.Module):
    def __init__(self, c: VAEConfig, out_channels: int):
        super().__init__()
        dims = [c.dim * m for m in (1, *c.dim_mult)]
        scale = 1.0
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        out_dim = dims[0]
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(c.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim, c.dropout))
                if scale in c.attn_scales:
                    layers.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(c.dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if c.temperal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(ResidualBlock(out_dim, out_dim, c.dropout), AttentionBlock(out_dim),
                                    ResidualBlock(out_dim, out_dim, c.dropout))
        self.head = nn.Sequential(ChannelRMSNorm(out_dim, images=False), nn.SiLU(),
                                  CausalConv3d(out_dim, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: _StreamCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.downsamples, *self.middle, *self.head):
            x = _run(layer, x, cache)
        return x


class Decoder3d(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        mult = c.dim_mult
        dims = [c.dim * m for m in (mult[-1], *mult[::-1])]
        temporal_up = tuple(c.temperal_downsample[::-1])
        scale = 1.0 / 2 ** (len(mult) - 2)
        self.conv1 = CausalConv3d(c.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0], c.dropout), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0], c.dropout))
        layers: list[nn.Module] = []
        out_dim = dims[0]
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i in (1, 2, 3):
                in_dim = in_dim // 2  # the previous Resample halved the channels
            blocks = c.num_res_blocks + 1 if c.decoder_res_blocks is None else c.decoder_res_blocks
            for _ in range(blocks):
                layers.append(ResidualBlock(in_dim, out_dim, c.dropout))
                if scale in c.attn_scales:
                    layers.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temporal_up[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(ChannelRMSNorm(out_dim, images=False), nn.SiLU(),
                                  CausalConv3d(out_dim, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: _StreamCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.middle, *self.upsamples, *self.head):
            x = _run(layer, x, cache)
        return x


class CausalVideoVAE(nn.Module):
    """Wan2.1-layout causal video VAE: `encode`, `decode`, and streaming `decode_chunk`."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder3d(config, config.z_dim * 2)
        self.conv1 = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)
        for i, m in enumerate(m for m in self.modules() if isinstance(m, CausalConv3d)):
            m.stream_id = i
        self.register_buffer("latent_mean", torch.zeros(config.z_dim), persistent=False)
        self.register_buffer("latent_std", torch.ones(config.z_dim), persistent=False)

    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel statistics: latents are (mu - mean) / std (not part of the state dict)."""
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.numel() != self.config.z_dim or std.numel() != self.config.z_dim:
            raise ValueError(f"latent mean/std must have {self.config.z_dim} values")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.config.z_dim, 1, 1, 1)
        return (self.latent_mean.to(x.dtype).reshape(shape), self.latent_std.to(x.dtype).reshape(shape))

    # -- encoding -------------------------------------------------------------------------------
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Frames [B, 3, 1+4k, H, W] in [-1, 1] -> normalised latent mean [B, z, 1+k, H/8, W/8]."""
        tf, sf = self.config.temporal_factor, self.config.spatial_factor
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, T, H, W], got {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        if (t - 1) % tf:
            raise ValueError(f"video must have 1 + {tf}k frames, got {t}")
        if h % sf or w % sf:
            raise ValueError(f"video height/width must be multiples of {sf}, got {h}x{w}")
        cache = _StreamCache()
        # First frame alone, then the remaining frames: the causal temporal downsampler treats
        # the first frame of a stream on its own.
        parts = [self.encoder(video[:, :, :1], cache)]
        if t > 1:
            parts.append(self.encoder(video[:, :, 1:], cache))
        mu = self.conv1(torch.cat(parts, dim=2))[:, : self.config.z_dim]
        mean, std = self._stats(mu)
        return (mu - mean) / std

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Reference image [B, 3, H, W] in [-1, 1] -> latent [B, z, 1, H/8, W/8]."""
        if image.dim() != 4:
            raise ValueError(f"image must be [B, 3, H, W], got {tuple(image.shape)}")
        return self.encode(image.unsqueeze(2))

    # -- decoding -------------------------------------------------------------------------------
    def new_decode_state(self) -> VAEDecodeState:
        return VAEDecodeState()

    def decode_chunk(self, latent: torch.Tensor, state: VAEDecodeState) -> torch.Tensor:
        """Streaming decode: latents [B, z, T, h, w] of the next chunk -> their frames.

        The first latent of a session gives one frame, every later latent `temporal_factor`
        frames; `state` carries the causal conv tails between calls.
        """
        if latent.dim() != 5 or latent.shape[1] != self.config.z_dim:
            raise ValueError(f"latents must be [B, {self.config.z_dim}, T, h, w], got {tuple(latent.shape)}")
        mean, std = self._stats(latent)
        x = self.conv2(latent * std + mean)
        if state.num_latents_decoded == 0 and x.shape[2] > 1:
            first = self.decoder(x[:, :, :1], state.cache)
            rest = self.decoder(x[:, :, 1:], state.cache)
            out = torch.cat([first, rest], dim=2)
        else:
            out = self.decoder(x, state.cache)
        state.num_latents_decoded += latent.shape[2]
        return out

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """All latents at once -> frames [B, 3, 1 + 4(T-1), H, W] (not clamped, as the reference)."""
        return self.decode_chunk(latent, self.new_decode_state())
