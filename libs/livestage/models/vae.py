"""The causal 3D video VAE (Wan2.1 layout) with a streaming, per-session decoder.

What it is. An encoder of 3D convolutions compresses video 4x in time and 8x in space (default
layout) into `z_dim` latent channels (it predicts a posterior mean and log-variance; we only use
the mean), two 1x1x1 convolutions (`conv1` after the encoder, `conv2` before the decoder) sit
around the latent, and a decoder mirrors the encoder. Parameter names follow the Wan-native
checkpoint layout exactly (`encoder.downsamples.N.residual.{0,2,3,6}`, `...resample.1`,
`...time_conv`, `gamma`, `to_qkv`, `proj`, ...), so a real `Wan2.1_VAE` state dict loads with
strict key checking.

Why it streams. Every 3D convolution is causal in time: an output frame depends on its input frame
and the two before it, never on later ones. Decoding a long stream chunk by chunk is therefore
exact if each convolution remembers the last two frames it was fed (its "tail"): the next chunk
sees them in place of the zero padding a fresh stream would get. `VAEDecodeState` holds those tails
for one session, so its size depends on the resolution only, never on the session length.

Time structure (matches the reference model). The first frame of a stream is a latent of its own;
after it, every `temporal_factor` frames make one latent. Encoding: the temporal downsamplers let
the first frame through unchanged and then pair frames with stride 2. Decoding: the temporal
upsamplers leave the first latent as one frame and turn every later latent into two frames per
stage, with a zero causal context at the second latent (the first latent is not part of it). With
the default layout, the first latent decodes to 1 frame and every later latent to 4 frames.

Output range. `decode` and `decode_chunk` return what the network produces (the reference model's
`decode` does not clamp; a trained VAE stays close to [-1, 1] but can overshoot); pass
`clamp=True` to get frames clamped to [-1, 1] for display.

Speed notes (CPU inference is a target). Under `torch.no_grad` the norm -> SiLU -> causal conv
sequences write their activation straight into a buffer that already holds the cached tail, so
the temporal padding costs no extra copy; nearest-2x-upsample + 3x3 conv runs as one sub-pixel
convolution on the low-resolution frames (same result, no upsampled copy, fewer bytes moved); 1x1x1
convolutions run as plain matrix products.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "WAN21_LATENT_MEAN",
    "WAN21_LATENT_STD",
    "CausalVideoVAE",
    "VAEConfig",
    "VAEDecodeState",
    "VAEEncodeState",
]

# Published per-channel statistics of the Wan2.1 VAE latent space (z_dim 16): a trained model's
# latents are normalised as (mu - mean) / std before the DiT sees them.
WAN21_LATENT_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENT_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

CONTEXT_FRAMES = 2
"""Past frames a temporal kernel of size 3 needs: the length of every cached conv tail."""

ENCODE_LATENTS_PER_PASS = 4
"""`encode` runs the encoder on this many latents' worth of frames at a time (after the first
frame), carrying the conv tails between passes: same result, bounded activation memory."""

_TailStore = dict[str, Tensor]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VAEConfig:
    """Shape of the VAE. Field names are the reference constructor's arguments (including its
    spelling `temperal_downsample`), so a reference config dict maps onto it one to one."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    decoder_res_blocks: int | None = None
    """LiveStage extension, not in the reference: residual blocks per decoder stage. None keeps
    the Wan layout (num_res_blocks + 1); the CPU `demo` preset uses 1 to decode in real time.
    Any other value changes the parameter set, so Wan checkpoints only load with None."""

    def __post_init__(self) -> None:
        # Accept lists (JSON, YAML) but store tuples, so configs stay hashable and comparable.
        for name in ("dim_mult", "attn_scales", "temperal_downsample"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        problems = []
        if self.dim < 1 or self.z_dim < 1:
            problems.append(f"dim and z_dim must be positive (got {self.dim}, {self.z_dim})")
        if not self.dim_mult or any(m < 1 for m in self.dim_mult):
            problems.append(f"dim_mult must be positive integers (got {self.dim_mult})")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            problems.append(
                f"temperal_downsample needs one entry per resampling stage, "
                f"len(dim_mult) - 1 = {len(self.dim_mult) - 1} "
                f"(got {len(self.temperal_downsample)})"
            )
        if self.num_res_blocks < 1:
            problems.append(f"num_res_blocks must be >= 1 (got {self.num_res_blocks})")
        if self.decoder_res_blocks is not None and self.decoder_res_blocks < 1:
            problems.append(
                f"decoder_res_blocks must be >= 1 or None (got {self.decoder_res_blocks})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout})")
        if problems:
            raise ValueError("invalid VAEConfig: " + "; ".join(problems))

    @classmethod
    def from_reference(cls, cfg: Mapping[str, Any]) -> "VAEConfig":
        """Builds the config from reference constructor arguments (e.g. a parity archive's JSON).

        Unknown keys are an error rather than silently dropped: a key we do not model means the
        checkpoint was made for a different architecture.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown VAE config keys: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})

    @property
    def temporal_factor(self) -> int:
        """Frames per latent after the first one (4 for the Wan layout)."""
        return 2 ** sum(bool(t) for t in self.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along height and width (8 for the Wan layout)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def decoder_blocks_per_stage(self) -> int:
        if self.decoder_res_blocks is None:
            return self.num_res_blocks + 1
        return self.decoder_res_blocks


# --------------------------------------------------------------------------------------------
# Streaming state
# --------------------------------------------------------------------------------------------


@dataclass
class VAEDecodeState:
    """One session's streaming decode state.

    `tails` maps each causal convolution (by its module path, e.g. `decoder.middle.0.residual.2`)
    to the last `CONTEXT_FRAMES` frames it was fed, `[B, C, 2, h, w]`; nothing else is kept, so
    the size is fixed by batch, resolution and model width. `num_latents_decoded` says where the
    stream is: 0 means the next latent is the session's first (decoded to a single frame).

    The state is plain tensors: `copy.deepcopy` snapshots it, `to_tensors` / `from_tensors`
    round-trip it through safetensors or a message bus, and dropping it and calling
    `CausalVideoVAE.new_decode_state()` starts a fresh stream.
    """

    tails: dict[str, Tensor] = field(default_factory=dict)
    num_latents_decoded: int = 0
    latent_geometry: tuple[int, int, int] | None = None
    """(batch, h, w) of the latents this stream decodes; a chunk of another shape is refused."""

    def nbytes(self) -> int:
        """Memory held by the cached tails, in bytes."""
        return sum(t.numel() * t.element_size() for t in self.tails.values())

    def to_tensors(self) -> dict[str, Tensor]:
        """Flat tensor dict (safetensors-ready) holding everything needed to resume the stream."""
        out = {f"tail.{k}": v.contiguous() for k, v in self.tails.items()}
        out["num_latents_decoded"] = torch.tensor([self.num_latents_decoded], dtype=torch.int64)
        if self.latent_geometry is not None:
            out["latent_geometry"] = torch.tensor(self.latent_geometry, dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> "VAEDecodeState":
        """Inverse of `to_tensors`."""
        if "num_latents_decoded" not in tensors:
            raise ValueError("not a VAE decode state: 'num_latents_decoded' is missing")
        geometry = tensors.get("latent_geometry")
        return cls(
            tails={k[len("tail."):]: v for k, v in tensors.items() if k.startswith("tail.")},
            num_latents_decoded=int(tensors["num_latents_decoded"].reshape(-1)[0]),
            latent_geometry=None if geometry is None else tuple(int(g) for g in geometry.tolist()),
        )

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> "VAEDecodeState":
        """A copy with the tails moved/cast (e.g. to park an idle session in host memory)."""
        return VAEDecodeState({k: v.to(device=device, dtype=dtype) for k, v in self.tails.items()},
                              self.num_latents_decoded, self.latent_geometry)


@dataclass
class VAEEncodeState:
    """The encoder's conv tails for a video encoded piece by piece (`encode_chunk`);
    `frames_encoded` 0 means the next frame is the video's first (a latent of its own)."""

    tails: dict[str, Tensor] = field(default_factory=dict)
    frames_encoded: int = 0


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _fast_path() -> bool:
    """In-place / out= / direct-oneDNN tricks are for eager inference only: autograd would need
    the overwritten values, and under torch.compile the compiler fuses and picks kernels itself
    (and cannot trace `out=` or the oneDNN op)."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _conv3d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, ...] = (1, 1, 1),
            padding: tuple[int, ...] = (0, 0, 0)) -> Tensor:
    """F.conv3d, but on CPU float32 inference always through oneDNN: PyTorch's heuristic sends
    batch-1 inputs with few channels x frames x rows to a naive kernel that is 2-3x slower
    (every low-resolution VAE layer at batch 1)."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and _fast_path() and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled):
        return torch.mkldnn_convolution(x, weight, bias, padding, stride, (1, 1, 1), 1)
    return F.conv3d(x, weight, bias, stride, padding)


def _pointwise(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1x1x1 convolution of [B, C, *S] as a channel matrix product (much faster than the
    generic convolution kernels on CPU, and no layout change needed)."""
    b, c = x.shape[:2]
    y = torch.matmul(weight.reshape(weight.shape[0], c), x.reshape(b, c, -1))
    if bias is not None:
        y = y.add_(bias[:, None]) if _fast_path() else y + bias[:, None]
    return y.reshape(b, -1, *x.shape[2:])


class CausalConv3d(nn.Conv3d):
    """3D convolution that looks only at the past along time (zero or cached context), with
    ordinary symmetric zero padding in space.

    `context` is the number of past frames the kernel needs (2 for a temporal kernel of 3 with
    padding 1, 0 for a temporal kernel of 1 or an unpadded one). When a tail store is given, the
    conv reads its tail from it instead of zeros and writes back the last `context` frames of its
    input, which is what the next call needs.
    """

    cache_key: str = ""  # set by CausalVideoVAE to the module path

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1,
                 padding: int | tuple[int, int, int] = 0) -> None:
        pad = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        # Space is padded by the convolution itself (no padded copy of the input); time is padded
        # on the past side only, by the caller-supplied tail.
        super().__init__(in_dim, out_dim, kernel_size, stride=stride, padding=(0, pad[1], pad[2]))
        self.context = 2 * pad[0]
        self.is_pointwise = self.kernel_size == (1, 1, 1) and self.stride == (1, 1, 1)

    def _tail_or_zeros(self, x: Tensor, tails: _TailStore | None) -> Tensor:
        tail = tails.get(self.cache_key) if tails is not None else None
        if tail is None:
            return x.new_zeros(*x.shape[:2], self.context, *x.shape[3:])
        return tail.to(dtype=x.dtype, device=x.device)

    def forward(self, x: Tensor, tails: _TailStore | None = None) -> Tensor:
        if self.context:
            x = torch.cat([self._tail_or_zeros(x, tails), x], dim=2)
            if tails is not None:
                tails[self.cache_key] = x[:, :, -self.context:].clone()
        return self.conv_padded(x)

    def conv_padded(self, x: Tensor) -> Tensor:
        """Applies the convolution to an input that already carries its temporal context."""
        if self.is_pointwise:
            return _pointwise(x, self.weight, self.bias)
        return _conv3d(x, self.weight, self.bias, self.stride, self.padding)

    def norm_silu_conv(self, x: Tensor, norm: "ChannelRMSNorm", tails: _TailStore | None) -> Tensor:
        """`self(silu(norm(x)), tails)`. With autograd off, the activation is written straight
        after the tail into one buffer, so the temporal padding costs no concatenation copy."""
        if not self.context or not _fast_path():
            return self(F.silu(norm(x)), tails)
        b, c, t, h, w = x.shape
        buf = x.new_empty(b, c, self.context + t, h, w)
        buf[:, :, : self.context] = self._tail_or_zeros(x, tails)
        F.silu(norm(x, out=buf[:, :, self.context:]), inplace=True)
        if tails is not None:
            tails[self.cache_key] = buf[:, :, -self.context:].clone()
        return self.conv_padded(buf)


class ChannelRMSNorm(nn.Module):
    """Normalises each position's channel vector to unit L2 norm, then scales it by
    sqrt(C) * gamma (an RMS norm over channels without mean removal or bias).

    `frames=True` gives gamma the [C, 1, 1] shape the reference uses for 2D (per-frame) inputs,
    `False` the [C, 1, 1, 1] shape for video inputs; the shape only matters for checkpoint keys,
    this module broadcasts over channels of any [B, C, ...] input.
    """

    def __init__(self, dim: int, frames: bool = False) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if frames else (1, 1, 1))))

    def channel_gain(self, x: Tensor) -> Tensor:
        gain = (self.gamma.reshape(-1) * self.scale).to(x.dtype)
        return gain.reshape(1, -1, *[1] * (x.dim() - 2))

    def inverse_norm(self, x: Tensor) -> Tensor:
        # 1 / max(||x||, 1e-12) over channels. A sum of squares is several times faster on CPU
        # than torch's channel-dim vector norm kernel for video-shaped tensors.
        return x.square().sum(dim=1, keepdim=True).clamp_min(1e-24).rsqrt()

    def forward(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        if out is None:
            return x * self.inverse_norm(x) * self.channel_gain(x)
        torch.mul(x, self.inverse_norm(x), out=out)
        return out.mul_(self.channel_gain(x))


class ResidualBlock(nn.Module):
    """x + conv(drop(act(norm(conv(act(norm(x))))))), with a 1x1x1 shortcut when the width
    changes. `residual` keeps the reference's 7-slot layout (norm, SiLU, conv, norm, SiLU,
    dropout, conv), which fixes the checkpoint keys residual.{0,2,3,6}."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            ChannelRMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            ChannelRMSNorm(out_dim), nn.SiLU(), nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut: nn.Module = (CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim
                                    else nn.Identity())

    def forward(self, x: Tensor, tails: _TailStore | None = None) -> Tensor:
        norm_in, _, conv_in, norm_mid, _, drop, conv_out = self.residual
        skip = self.shortcut(x)
        h = conv_in.norm_silu_conv(x, norm_in, tails)
        if self.training and drop.p > 0:
            h = conv_out(drop(F.silu(norm_mid(h))), tails)
        else:
            h = conv_out.norm_silu_conv(h, norm_mid, tails)
        return h.add_(skip) if _fast_path() else h + skip


class AttentionBlock(nn.Module):
    """Single-head self-attention over the positions of each frame (frames do not attend to
    each other, so it is causal in time and needs no cache)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = ChannelRMSNorm(dim, frames=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, tails: _TailStore | None = None) -> Tensor:
        b, c, t, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, c)
        qkv = F.linear(tokens, self.to_qkv.weight.reshape(3 * c, c), self.to_qkv.bias)
        q, k, v = qkv.chunk(3, dim=-1)
        attended = F.scaled_dot_product_attention(q, k, v)
        y = F.linear(attended, self.proj.weight.reshape(c, c), self.proj.bias)
        return x + y.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)


# For nearest-neighbour 2x upsampling followed by a 3x3 convolution (zero padding 1): output row
# 2p + a only sees input rows p-1..p+1, with the 3 taps of the kernel folded onto them as below
# (a = 0: rows p-1, p, p; a = 1: rows p, p, p+1). _SUBPIXEL_FOLD[a, new_tap, old_tap].
_SUBPIXEL_FOLD = torch.tensor([
    [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]],
    [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
])


def _subpixel_kernel(weight: Tensor) -> Tensor:
    """[O, I, 3, 3] conv kernel -> [O*4, I, 1, 3, 3] kernel computing the 4 output phases of
    (upsample 2x nearest, then conv) on the low-resolution input; channel o*4 + 2a + b is
    phase (row a, column b) of output channel o."""
    fold = _SUBPIXEL_FOLD.to(device=weight.device, dtype=weight.dtype)
    o, i = weight.shape[:2]
    return torch.einsum("ayk,bxl,oikl->oabiyx", fold, fold, weight).reshape(o * 4, i, 1, 3, 3)


class Resample(nn.Module):
    """2x spatial up/down-sampling between stages, optionally with 2x temporal resampling.

    Down (encoder): pad right/bottom by one, 3x3 stride-2 conv per frame; the temporal variant
    then convolves frame pairs with stride 2 (kernel 3 over the previous odd frame and the pair).
    Up (decoder): the temporal variant first turns each frame into two (a causal kernel-3 conv
    with 2C outputs, one half per new frame), then every frame is upsampled 2x (nearest) and
    convolved to C/2 channels. At the start of a stream the first frame skips the temporal step
    in both directions.
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown resample mode {mode!r} (expected one of {self.MODES})")
        self.mode = mode
        self.is_up = mode.startswith("up")
        self.temporal = mode.endswith("3d")
        # Slot 0 holds a parameter-free op so the conv sits at `resample.1` as in checkpoints.
        if self.is_up:
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
            if self.temporal:
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)),
                                          nn.Conv2d(dim, dim, 3, stride=2))
            if self.temporal:
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, tails: _TailStore, stream_start: bool) -> Tensor:
        if self.is_up:
            return self._up(x, tails, stream_start)
        conv: nn.Conv2d = self.resample[1]  # type: ignore[assignment]
        x = _conv3d(F.pad(x, (0, 1, 0, 1)), conv.weight.unsqueeze(2), conv.bias, stride=(1, 2, 2))
        return self._time_down(x, tails, stream_start) if self.temporal else x

    # -- decoder side ---------------------------------------------------------------------------
    def _up(self, x: Tensor, tails: _TailStore, stream_start: bool) -> Tensor:
        if not self.temporal:
            return self._space_up(x, pairs=None)
        if stream_start:
            # The stream's first frame stays one frame; later frames start from a zero context.
            first = self._space_up(x[:, :, :1], pairs=None)
            if x.shape[2] == 1:
                return first
            return torch.cat([first, self._space_up(self.time_conv(x[:, :, 1:], tails), pairs=2)],
                             dim=2)
        return self._space_up(self.time_conv(x, tails), pairs=2)

    def _space_up(self, x: Tensor, pairs: int | None) -> Tensor:
        """2x nearest upsample + 3x3 conv as one sub-pixel conv on the low-resolution frames.

        With `pairs=2`, x is the temporal conv's output [B, 2C, T, H, W] whose channel halves are
        frames 2t and 2t+1; the interleave is folded into the single output rearrangement.
        """
        conv: nn.Conv2d = self.resample[1]  # type: ignore[assignment]
        out_c = conv.out_channels
        s = pairs or 1
        b, c, t, h, w = x.shape
        x = x.reshape(b * s, c // s, t, h, w)
        y = _conv3d(x, _subpixel_kernel(conv.weight), conv.bias.repeat_interleave(4),
                    padding=(0, 1, 1))
        # [B, s, O, a, b, T, H, W] -> [B, O, T, s, H, a, W, b] -> [B, O, s*T, 2H, 2W]
        y = y.reshape(b, s, out_c, 2, 2, t, h, w).permute(0, 2, 5, 1, 6, 3, 7, 4)
        return y.reshape(b, out_c, t * s, 2 * h, 2 * w)

    # -- encoder side ---------------------------------------------------------------------------
    def _time_down(self, x: Tensor, tails: _TailStore, stream_start: bool) -> Tensor:
        key = self.time_conv.cache_key
        if stream_start:
            # The first frame passes alone and is the context of the first pair.
            head = x[:, :, :1]
            rest = self.time_conv(x) if x.shape[2] > 1 else None
        else:
            head = None
            rest = self.time_conv(torch.cat([tails[key].to(x.dtype), x], dim=2))
        tails[key] = x[:, :, -1:].clone()
        if head is None:
            return rest  # type: ignore[return-value]
        return head if rest is None else torch.cat([head, rest], dim=2)


def _run(layer: nn.Module, x: Tensor, tails: _TailStore, stream_start: bool) -> Tensor:
    if isinstance(layer, Resample):
        return layer(x, tails, stream_start)
    return layer(x, tails)


def _head(norm_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(ChannelRMSNorm(norm_dim), nn.SiLU(),
                         CausalConv3d(norm_dim, out_dim, 3, padding=1))


class Encoder3d(nn.Module):
    """Frames [B, 3, T, H, W] -> [B, out_channels, latent T, H/8, W/8] (Wan layout)."""

    def __init__(self, c: VAEConfig, out_channels: int) -> None:
        super().__init__()
        widths = [c.dim * m for m in (1, *c.dim_mult)]
        self.conv1 = CausalConv3d(3, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        scale = 1.0
        for stage, (width_in, width) in enumerate(zip(widths[:-1], widths[1:])):
            for _ in range(c.num_res_blocks):
                layers.append(ResidualBlock(width_in, width, c.dropout))
                if scale in c.attn_scales:
                    layers.append(AttentionBlock(width))
                width_in = width
            if stage < len(c.dim_mult) - 1:
                layers.append(Resample(width, "downsample3d" if c.temperal_downsample[stage]
                                       else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*layers)
        top = widths[-1]
        self.middle = nn.Sequential(ResidualBlock(top, top, c.dropout), AttentionBlock(top),
                                    ResidualBlock(top, top, c.dropout))
        self.head = _head(top, out_channels)

    def forward(self, x: Tensor, tails: _TailStore, stream_start: bool) -> Tensor:
        x = self.conv1(x, tails)
        for layer in (*self.downsamples, *self.middle):
            x = _run(layer, x, tails, stream_start)
        return self.head[2].norm_silu_conv(x, self.head[0], tails)


class Decoder3d(nn.Module):
    """Latents [B, z, T, h, w] -> frames [B, 3, T', 8h, 8w] (Wan layout), where T' counts 1 frame
    for a stream's first latent and `temporal_factor` frames for each other one."""

    def __init__(self, c: VAEConfig) -> None:
        super().__init__()
        mult = c.dim_mult
        widths = [c.dim * m for m in (mult[-1], *mult[::-1])]
        temporal_up = c.temperal_downsample[::-1]
        scale = 1.0 / 2 ** (len(mult) - 2)
        top = widths[0]
        self.conv1 = CausalConv3d(c.z_dim, top, 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(top, top, c.dropout), AttentionBlock(top),
                                    ResidualBlock(top, top, c.dropout))
        layers: list[nn.Module] = []
        width = top
        for stage, (width_in, width) in enumerate(zip(widths[:-1], widths[1:])):
            if stage > 0:
                width_in //= 2  # the upsampler before this stage halved the channels
            for _ in range(c.decoder_blocks_per_stage):
                layers.append(ResidualBlock(width_in, width, c.dropout))
                if scale in c.attn_scales:
                    layers.append(AttentionBlock(width))
                width_in = width
            if stage < len(mult) - 1:
                layers.append(Resample(width, "upsample3d" if temporal_up[stage] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*layers)
        self.head = _head(width, 3)

    def forward(self, x: Tensor, tails: _TailStore, stream_start: bool) -> Tensor:
        x = self.conv1(x, tails)
        for layer in (*self.middle, *self.upsamples):
            x = _run(layer, x, tails, stream_start)
        return self.head[2].norm_silu_conv(x, self.head[0], tails)


# --------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------


class CausalVideoVAE(nn.Module):
    """Wan2.1-layout causal video VAE: `encode`, `encode_image`, `decode`, and the streaming
    `decode_chunk` with a per-session `VAEDecodeState`.

    Latents in and out are normalised per channel, (mu - latent_mean) / latent_std. The
    statistics are non-persistent buffers (default mean 0, std 1) so Wan checkpoints, which do
    not contain them, load strictly; set them with `set_latent_stats` (for a real Wan2.1 VAE:
    `WAN21_LATENT_MEAN`, `WAN21_LATENT_STD`).
    """

    latent_mean: Tensor
    latent_std: Tensor

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder3d(config, config.z_dim * 2)  # posterior mean and log-variance
        self.conv1 = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)
        for name, module in self.named_modules():
            if isinstance(module, CausalConv3d):
                module.cache_key = name
        self.register_buffer("latent_mean", torch.zeros(config.z_dim), persistent=False)
        self.register_buffer("latent_std", torch.ones(config.z_dim), persistent=False)

    def set_latent_stats(self, mean: Tensor | tuple[float, ...],
                         std: Tensor | tuple[float, ...]) -> None:
        """Per-channel latent statistics (z_dim values each; std must be positive)."""
        z = self.config.z_dim
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean_t.numel() != z or std_t.numel() != z:
            raise ValueError(f"latent mean/std must have {z} values each, "
                             f"got {mean_t.numel()} and {std_t.numel()}")
        if not torch.isfinite(mean_t).all() or not (std_t > 0).all():
            raise ValueError("latent mean must be finite and latent std positive")
        with torch.no_grad():
            self.latent_mean.copy_(mean_t)
            self.latent_std.copy_(std_t)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, self.config.z_dim, 1, 1, 1)
        return (self.latent_mean.to(like.dtype).reshape(shape),
                self.latent_std.to(like.dtype).reshape(shape))

    # -- encoding -------------------------------------------------------------------------------
    def encode(self, video: Tensor) -> Tensor:
        """Frames [B, 3, 1 + 4k, H, W] in [-1, 1] -> normalised posterior mean
        [B, z, 1 + k, H/8, W/8] (factors for the default layout; see VAEConfig)."""
        return self.encode_chunk(video, VAEEncodeState())

    def encode_chunk(self, video: Tensor, state: "VAEEncodeState") -> Tensor:
        """Streaming encode of the next frames of a video, carrying conv tails in `state`: the
        first call takes 1 + 4k frames, later calls 4k frames, and concatenating the outputs
        equals `encode` of all frames at once (training warms a long stream up this way without
        keeping its graph)."""
        tf, sf = self.config.temporal_factor, self.config.spatial_factor
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, T, H, W], got shape {tuple(video.shape)}")
        if not video.is_floating_point():
            raise ValueError(f"video must be a floating point tensor in [-1, 1], got {video.dtype}")
        b, _, t, h, w = video.shape
        start = state.frames_encoded == 0
        lead = 1 if start else 0
        if b < 1 or t < 1 or (t - lead) % tf:
            what = f"1 + {tf}k frames (1, {1 + tf}, {1 + 2 * tf}, ...)" if start else f"{tf}k frames after the first call"
            raise ValueError(f"video must have {what}, got {t}")
        if h < sf or w < sf or h % sf or w % sf:
            raise ValueError(f"video height and width must be positive multiples of {sf}, "
                             f"got {h}x{w}")
        step = tf * ENCODE_LATENTS_PER_PASS
        bounds = [0, *range(lead + step, t, step), t]  # a stream's first pass: its first frame + one group
        parts = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            parts.append(self.encoder(video[:, :, lo:hi], state.tails, stream_start=state.frames_encoded == 0))
            state.frames_encoded += hi - lo
        features = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        mu = self.conv1(features)[:, : self.config.z_dim]
        mean, std = self._stats(mu)
        return (mu - mean) / std

    def encode_image(self, image: Tensor) -> Tensor:
        """Image [B, 3, H, W] in [-1, 1] -> latent [B, z, 1, H/8, W/8] (a one-frame video)."""
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be [B, 3, H, W], got shape {tuple(image.shape)}")
        return self.encode(image.unsqueeze(2))

    # -- decoding -------------------------------------------------------------------------------
    def new_decode_state(self) -> VAEDecodeState:
        """An empty streaming state: the next latent decoded with it starts a new stream."""
        return VAEDecodeState()

    def decode(self, latent: Tensor, *, clamp: bool = False,
               max_latents_per_pass: int | None = None) -> Tensor:
        """Normalised latents [B, z, T, h, w] of a whole stream -> frames
        [B, 3, 1 + 4(T-1), 8h, 8w] (factors for the default layout).

        Not clamped by default (as the reference model); `clamp=True` clamps to [-1, 1].
        """
        return self.decode_chunk(latent, self.new_decode_state(), clamp=clamp,
                                 max_latents_per_pass=max_latents_per_pass)

    def decode_chunk(self, latent: Tensor, state: VAEDecodeState, *, clamp: bool = False,
                     max_latents_per_pass: int | None = None) -> Tensor:
        """Streaming decode of the next latents of a session, carrying conv tails in `state`.

        Any number of latents per call: the session's first latent gives 1 frame, every later
        one `temporal_factor` frames, and concatenating the outputs of successive calls equals
        `decode` of all latents at once. `max_latents_per_pass` bounds peak activation memory by
        running the decoder on at most that many latents at a time (same result).
        """
        z = self.config.z_dim
        if latent.dim() != 5 or latent.shape[1] != z or latent.shape[2] < 1:
            raise ValueError(
                f"latents must be [B, {z}, T>=1, h, w], got shape {tuple(latent.shape)}")
        geometry = (latent.shape[0], latent.shape[3], latent.shape[4])
        if state.latent_geometry is not None and state.latent_geometry != geometry:
            raise ValueError(f"this decode state streams latents of (batch, h, w) = "
                             f"{state.latent_geometry}, got {geometry}; start a new state")
        if max_latents_per_pass is not None and max_latents_per_pass < 1:
            raise ValueError(f"max_latents_per_pass must be >= 1, got {max_latents_per_pass}")
        mean, std = self._stats(latent)
        x = self.conv2(latent * std + mean)
        step = max_latents_per_pass or x.shape[2]
        parts = []
        for lo in range(0, x.shape[2], step):
            parts.append(self.decoder(x[:, :, lo:lo + step], state.tails,
                                      stream_start=state.num_latents_decoded == 0))
            state.num_latents_decoded += min(step, x.shape[2] - lo)
            state.latent_geometry = geometry
        frames = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        if clamp:
            frames = frames.clamp_(-1.0, 1.0) if _fast_path() else frames.clamp(-1.0, 1.0)
        return frames
