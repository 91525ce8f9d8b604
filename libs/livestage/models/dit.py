"""The Wan2.1-style diffusion transformer, made causal and chunk-wise, with LiveStage's conditions.

Parameter names follow the Wan-native checkpoint layout (`patch_embedding`, `text_embedding.{0,2}`,
`time_embedding.{0,2}`, `time_projection.1`, `blocks.N.self_attn.*`, `blocks.N.cross_attn.*`,
`blocks.N.norm3`, `blocks.N.ffn.{0,2}`, `blocks.N.modulation`, `head.head`, `head.modulation`), so a
Wan2.1 checkpoint loads with strict keys. LiveStage's extra modules have their own names:

- `speak_embedding.{0,2}` / `listen_embedding.{0,2}`: project audio features to the model width.
- `blocks.N.speak_attn.*` on even blocks and `blocks.N.listen_attn.*` on odd blocks: interleaved
  audio cross-attention with their own q/k/v/o, windowed per latent frame (tight for speak,
  wider for listen), plus `blocks.N.norm_audio`.
- `reference_embedding`: a learned type embedding (global / view / expression) added to the
  patch-embedded reference-image tokens.

The same weights run three ways (see `attention.py`): bidirectional over a whole clip (the
reference forward and the teacher), one chunk at a time against a pre-RoPE history cache
(streaming), or a whole sequence under an explicit chunk-causal mask (used by tests).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from livestage.models.attention import (
    AttentionPlan,
    BidirectionalAttention,
    ReferencePrefillAttention,
    StreamingChunkAttention,
    sdpa,
)
from livestage.models.config import REFERENCE_KINDS, ChunkConfig, DiTConfig
from livestage.models.kv_cache import CacheGeometry, CachedChunk, ChunkKVCache, ReferenceKV
from livestage.models.rope import Rotary3D, grid_positions


_EXTRA_KEY = re.compile(
    r"^(speak_embedding|listen_embedding|reference_embedding)\.|"
    r"^blocks\.\d+\.(speak_attn|listen_attn|norm_audio)\."
)


def is_extra_key(key: str) -> bool:
    """True for parameters of LiveStage's modules that a base Wan2.1 checkpoint does not have."""
    return bool(_EXTRA_KEY.match(key))


def sinusoidal_embedding(dim: int, position: torch.Tensor) -> torch.Tensor:
    """Timestep embedding [..., dim] computed in float64 like the reference (cos first, then sin)."""
    half = dim // 2
    pos = position.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=pos.device) / half)
    angles = pos.unsqueeze(-1) * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class RMSNorm(nn.Module):
    """RMS normalisation over the last dim (computed in float32), learned scale `weight`."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class FloatLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation dtype (bf16 safety)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return torch.nn.functional.layer_norm(x.float(), self.normalized_shape, weight, bias,
                                              self.eps).type_as(x)


class _Projections(nn.Module):
    """q/k/v/o projections with optional q/k RMSNorm over the full width (Wan layout)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))


class SelfAttention(_Projections):
    """Self-attention whose visibility and positions come from the `AttentionPlan`."""

    def forward(self, x: torch.Tensor, plan: AttentionPlan, layer: int) -> torch.Tensor:
        q = self._heads(self.norm_q(self.q(x)))
        k = self._heads(self.norm_k(self.k(x)))
        v = self._heads(self.v(x))
        return self.o(plan.attend(layer, q, k, v).flatten(2))


class CrossAttention(_Projections):
    """Attention from tokens to a condition sequence (text or audio), optional visibility mask."""

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self._heads(self.norm_q(self.q(x)))
        k = self._heads(self.norm_k(self.k(context)))
        v = self._heads(self.v(context))
        return self.o(sdpa(q, k, v, mask).flatten(2))


@dataclass
class AudioContext:
    """Embedded audio tokens and, per video token, which audio frames it may attend to."""

    speak: torch.Tensor  # [B, A, dim]
    listen: torch.Tensor  # [B, A, dim]
    speak_mask: torch.Tensor  # [Lv, A] bool
    listen_mask: torch.Tensor  # [Lv, A] bool


class DiTBlock(nn.Module):
    """One Wan block (AdaLN-modulated self-attn, text cross-attn, FFN) + optional audio attn."""

    def __init__(self, config: DiTConfig, audio_stream: str | None):
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = FloatLayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, config.num_heads, config.qk_norm, eps)
        self.norm3 = (FloatLayerNorm(dim, eps, elementwise_affine=True)
                      if config.cross_attn_norm else nn.Identity())
        self.cross_attn = CrossAttention(dim, config.num_heads, config.qk_norm, eps)
        self.norm2 = FloatLayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(config.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.audio_stream = audio_stream
        if audio_stream is not None:
            self.norm_audio = FloatLayerNorm(dim, eps, elementwise_affine=True)
            attn = CrossAttention(dim, config.num_heads, config.qk_norm, eps)
            setattr(self, f"{audio_stream}_attn", attn)

    def _modulation(self, e0: torch.Tensor) -> list[torch.Tensor]:
        if e0.dim() == 3:  # [B, 6, dim]: one timestep per sample
            return [c for c in (self.modulation.float() + e0).chunk(6, dim=1)]
        # [B, L, 6, dim]: one timestep per token
        mod = self.modulation.float().unsqueeze(0) + e0
        return [c.squeeze(2) for c in mod.chunk(6, dim=2)]

    def forward(self, x: torch.Tensor, e0: torch.Tensor, plan: AttentionPlan, layer: int,
                context: torch.Tensor, audio: AudioContext | None, video_start: int) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self._modulation(e0)
        y = self.self_attn((self.norm1(x).float() * (1 + scale1) + shift1).type_as(x), plan, layer)
        x = x + (y.float() * gate1).type_as(x)
        x = x + self.cross_attn(self.norm3(x), context)
        if audio is not None and self.audio_stream is not None:
            x = self._audio(x, audio, video_start)
        y = self.ffn((self.norm2(x).float() * (1 + scale2) + shift2).type_as(x))
        return x + (y.float() * gate2).type_as(x)

    def _audio(self, x: torch.Tensor, audio: AudioContext, video_start: int) -> torch.Tensor:
        attn: CrossAttention = getattr(self, f"{self.audio_stream}_attn")
        tokens = audio.speak if self.audio_stream == "speak" else audio.listen
        mask = audio.speak_mask if self.audio_stream == "speak" else audio.listen_mask
        video = x[:, video_start:]
        update = attn(self.norm_audio(video), tokens, mask.to(x.device))
        if video_start == 0:
            return x + update
        return torch.cat([x[:, :video_start], video + update], dim=1)


class DiTHead(nn.Module):
    """Final AdaLN-modulated projection from tokens back to latent patches."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.dim
        out = math.prod(config.patch_size) * config.out_dim
        self.norm = FloatLayerNorm(dim, config.eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if e.dim() == 2:  # [B, dim]
            shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        else:  # [B, L, dim]
            mod = self.modulation.float().unsqueeze(0) + e.unsqueeze(2)
            shift, scale = (c.squeeze(2) for c in mod.chunk(2, dim=2))
        return self.head((self.norm(x).float() * (1 + scale) + shift).type_as(x))


@dataclass
class ChunkOutput:
    """What one streaming forward returns: the flow prediction and, if captured, the cache entry."""

    flow: torch.Tensor
    cached: CachedChunk | None


class WanDiT(nn.Module):
    """Wan2.1 DiT with chunk-causal streaming, audio cross-attention and reference tokens."""

    def __init__(self, config: DiTConfig, chunk: ChunkConfig | None = None):
        super().__init__()
        config.validate()
        self.config = config
        self.chunk = chunk
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, config.patch_size, config.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        streams = [None] * config.num_layers
        if config.audio_dim:
            streams = ["speak" if i % 2 == 0 else "listen" for i in range(config.num_layers)]
            self.speak_embedding = self._audio_embedding()
            self.listen_embedding = self._audio_embedding()
        self.blocks = nn.ModuleList([DiTBlock(config, s) for s in streams])
        self.head = DiTHead(config)
        if config.references:
            self.reference_embedding = nn.Embedding(len(REFERENCE_KINDS), dim)
        self.rotary = Rotary3D(config.head_dim, config.rope_max_positions)

    def _audio_embedding(self) -> nn.Sequential:
        c = self.config
        return nn.Sequential(nn.Linear(c.audio_dim, c.dim), nn.GELU(approximate="tanh"),
                             nn.Linear(c.dim, c.dim))

    # -- building blocks -------------------------------------------------------------------
    def embed_video(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[B, C, F, H, W] latents -> tokens [B, F*h*w, dim] in raster order, and the grid."""
        if x.dim() != 5 or x.shape[1] != self.config.in_dim:
            raise ValueError(
                f"latents must be [B, {self.config.in_dim}, F, H, W], got {tuple(x.shape)}"
            )
        pt, ph, pw = self.config.patch_size
        b, c, f, h, w = x.shape
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent grid {f}x{h}x{w} is not divisible by patch {self.config.patch_size}")
        grid = (f // pt, h // ph, w // pw)
        # A conv with kernel == stride is a linear map of non-overlapping patches; the matmul form
        # is the same arithmetic and much faster on CPU than a strided Conv3d.
        patches = x.reshape(b, c, grid[0], pt, grid[1], ph, grid[2], pw)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, math.prod(grid), c * pt * ph * pw)
        weight = self.patch_embedding.weight.reshape(self.config.dim, -1)
        tokens = torch.nn.functional.linear(patches.to(weight.dtype), weight, self.patch_embedding.bias)
        return tokens, grid

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        pt, ph, pw = self.config.patch_size
        c = self.config.out_dim
        b = tokens.shape[0]
        x = tokens.reshape(b, *grid, pt, ph, pw, c)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(b, c, grid[0] * pt, grid[1] * ph, grid[2] * pw)

    def time_modulation(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps [B] or [B, L] -> (e for the head, e0 for the blocks [.., 6, dim]), float32."""
        e = self.time_embedding(
            sinusoidal_embedding(self.config.freq_dim, t).float().to(self.time_embedding[0].weight.dtype)
        ).float()
        e0 = self.time_projection(e.to(self.time_projection[1].weight.dtype)).float()
        return e, e0.unflatten(-1, (6, self.config.dim))

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """Text features [B, Lc, text_dim] -> [B, text_len, dim], zero-padded like the reference."""
        c = self.config
        if context.dim() != 3 or context.shape[-1] != c.text_dim:
            raise ValueError(f"text context must be [B, L, {c.text_dim}], got {tuple(context.shape)}")
        if context.shape[1] > c.text_len:
            raise ValueError(f"text context has {context.shape[1]} tokens, more than text_len {c.text_len}")
        pad = c.text_len - context.shape[1]
        if pad:
            context = torch.cat([context, context.new_zeros(context.shape[0], pad, c.text_dim)], dim=1)
        return self.text_embedding(context.to(self.text_embedding[0].weight.dtype))

    def run_blocks(self, x: torch.Tensor, e0: torch.Tensor, plan: AttentionPlan,
                   context: torch.Tensor, audio: AudioContext | None = None,
                   video_start: int = 0) -> torch.Tensor:
        for layer, block in enumerate(self.blocks):
            x = block(x, e0, plan, layer, context, audio, video_start)
        return x

    # -- the reference (bidirectional) forward ------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Full bidirectional forward, as the reference `WanModel` (flow prediction, same shape)."""
        tokens, grid = self.embed_video(x)
        positions = grid_positions(*grid)
        plan = BidirectionalAttention(self.rotary, positions, tuple(self.config.window_size))
        e, e0 = self.time_modulation(t.reshape(-1).expand(x.shape[0]))
        hidden = self.run_blocks(tokens, e0, plan, self.embed_text(context))
        return self.unpatchify(self.head(hidden, e), grid)

    # -- streaming ------------------------------------------------------------------------------
    def cache_geometry(self, latent_height: int, latent_width: int, rollback_chunks: int = 0) -> CacheGeometry:
        if self.chunk is None:
            raise ValueError("this model was built without a ChunkConfig; it cannot stream")
        _, ph, pw = self.config.patch_size
        return CacheGeometry(
            num_layers=self.config.num_layers, num_heads=self.config.num_heads,
            head_dim=self.config.head_dim, latent_frames_per_chunk=self.chunk.latent_frames_per_chunk,
            grid_height=latent_height // ph, grid_width=latent_width // pw,
            sink_chunks=self.chunk.sink_chunks, window_chunks=self.chunk.window_chunks,
            rollback_chunks=rollback_chunks,
        )

    def forward_chunk(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                      cache: ChunkKVCache, audio: AudioContext | None = None,
                      capture: bool = False, chunk_index: int = -1) -> ChunkOutput:
        """One chunk of latents [B, C, F, h, w] at timestep(s) t [B], against the cache.

        `context` is already embedded (`embed_text`), so a directive is embedded once per chunk,
        not once per step. With `capture`, the returned `CachedChunk` holds this pass's pre-RoPE
        K/V and its input latent; the caller decides whether to commit it (`cache.append`).
        """
        tokens, grid = self.embed_video(x)
        expected = cache.geometry.tokens_per_chunk
        if tokens.shape[1] != expected:
            raise ValueError(f"chunk has {tokens.shape[1]} tokens, the cache expects {expected}")
        plan = StreamingChunkAttention(cache, self.rotary, capture=capture)
        e, e0 = self.time_modulation(t.reshape(-1).expand(x.shape[0]))
        hidden = self.run_blocks(tokens, e0, plan, context, audio)
        flow = self.unpatchify(self.head(hidden, e), grid)
        cached = None
        if capture:
            cached = CachedChunk(
                chunk_index=chunk_index,
                keys=[k for k in plan.captured_keys],  # type: ignore[misc]
                values=[v for v in plan.captured_values],  # type: ignore[misc]
                latent=x.detach(), timestep=float(t.reshape(-1)[0]),
            )
        return ChunkOutput(flow=flow, cached=cached)

    def reference_positions(self, kinds: list[str], geometry: CacheGeometry) -> torch.Tensor:
        """(t, h, w) positions of reference tokens: per-kind base offset + per-image sub-offset."""
        counts: dict[str, int] = {}
        parts = []
        for kind in kinds:
            i = counts.get(kind, 0)
            counts[kind] = i + 1
            base = self.config.reference_base_offsets[REFERENCE_KINDS.index(kind)]
            t = geometry.reference_t_origin + base + self.config.reference_sub_offset * i
            parts.append(grid_positions(1, geometry.grid_height, geometry.grid_width, t_offset=t))
        return torch.cat(parts)

    def reference_tokens(self, references: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """Patch-embedded reference latents [B, C, 1, h, w] plus their type embedding."""
        if not self.config.references:
            raise ValueError("this model has no reference-image support (config.references=False)")
        parts = []
        for kind, latent in references:
            if kind not in REFERENCE_KINDS:
                raise ValueError(f"unknown reference kind {kind!r}; use one of {REFERENCE_KINDS}")
            tokens, _ = self.embed_video(latent)
            type_id = torch.tensor(REFERENCE_KINDS.index(kind), device=tokens.device)
            parts.append(tokens + self.reference_embedding(type_id).to(tokens.dtype))
        return torch.cat(parts, dim=1)

    def prefill_references(self, references: list[tuple[str, torch.Tensor]], context: torch.Tensor,
                           cache: ChunkKVCache) -> None:
        """Runs the reference tokens once (at t=0, among themselves) and caches their K/V."""
        if not references:
            cache.set_reference(None)
            return
        tokens = self.reference_tokens(references)
        kinds = [kind for kind, _ in references]
        positions = self.reference_positions(kinds, cache.geometry)
        plan = ReferencePrefillAttention(self.rotary, positions, self.config.num_layers)
        t0 = torch.zeros(tokens.shape[0], device=tokens.device)
        _, e0 = self.time_modulation(t0)
        self.run_blocks(tokens, e0, plan, context)
        cache.set_reference(ReferenceKV(
            keys=list(plan.captured_keys), values=list(plan.captured_values),  # type: ignore[arg-type]
            positions=positions, kinds=kinds,
        ))

    def audio_context(self, speak: torch.Tensor | None, listen: torch.Tensor | None,
                      latent_frames: int, tokens_per_frame: int, batch: int = 1,
                      chunks: int = 1) -> AudioContext:
        """Embeds one chunk's audio window features [B, A, audio_dim] and builds the windows.

        The window's last `frames_per_chunk` audio frames belong to the current chunk; latent
        frame j covers `r = frames_per_chunk / latent_frames` video frames. Speak attention sees
        those frames +-speak_window (lips follow the current sound); listen sees +-listen_window,
        reaching back into the 2 s of history (reactions build up over time).

        `chunks > 1` is the same for a run of consecutive chunks seen at once (the bidirectional
        teacher): the window then holds the 2 s of history plus all of them, and `latent_frames`
        counts the latent frames of the whole run.
        """
        if self.chunk is None or not self.config.audio_dim:
            raise ValueError("audio conditioning needs audio_dim > 0 and a ChunkConfig")
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        a_frames = self.chunk.frames_per_chunk * (self.chunk.audio_history_chunks + chunks)
        c = self.config
        ref = self.speak_embedding[0].weight
        feats = []
        for name, f in (("speak", speak), ("listen", listen)):
            if f is None:
                f = torch.zeros(batch, a_frames, c.audio_dim, device=ref.device, dtype=ref.dtype)
            if f.dim() != 3 or f.shape[1] != a_frames or f.shape[2] != c.audio_dim:
                raise ValueError(
                    f"{name} audio features must be [B, {a_frames}, {c.audio_dim}], got {tuple(f.shape)}"
                )
            feats.append(f.to(ref.dtype))
        current = self.chunk.frames_per_chunk * chunks
        r = current / latent_frames
        start = a_frames - current
        centers = start + (torch.arange(latent_frames, dtype=torch.float64) + 0.5) * r - 0.5
        dist = (torch.arange(a_frames, dtype=torch.float64)[None, :] - centers[:, None]).abs()
        half = (r - 1) / 2

        def mask(window: int) -> torch.Tensor:
            per_frame = dist <= half + window + 1e-9
            return per_frame.repeat_interleave(tokens_per_frame, dim=0).to(ref.device)

        return AudioContext(
            speak=self.speak_embedding(feats[0]), listen=self.listen_embedding(feats[1]),
            speak_mask=mask(c.speak_window), listen_mask=mask(c.listen_window),
        )
