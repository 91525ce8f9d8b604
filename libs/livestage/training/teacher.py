"""The bidirectional teacher: the same Wan DiT seeing a run of chunks at once, full-step sampling.

The teacher is trained with flow matching on windows of two chunks. Every latent frame has its
own noise level, which gives the teacher two modes with one set of weights: both chunks noisy
(generating from scratch), or the first chunk clean (sigma 0) and the second noisy, which is
*chunk-wise continuation*: a long video is generated one chunk at a time, each conditioned on the
previous one. Reference images are prefilled exactly as in streaming (among themselves, at t=0,
with the same RoPE offsets), so teacher and students read the references the same way.

Classifier-free guidance covers text and audio: during training the directive is dropped (empty
text) and the audio features are zeroed, independently; sampling contrasts the full conditions
with neither.

Sampling integrates the probability-flow ODE with Euler steps on the shifted timestep grid
t_i = 1000 (1 - i/N), so with N a multiple of 4 the grid passes through the backbone's T1=750 and
the refiner's T2=500 exactly: the ODE trajectory can be read at the students' timesteps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from livestage.models.attention import sdpa
from livestage.models.dit import AudioContext, WanDiT
from livestage.models.kv_cache import ChunkKVCache, RotaryViews
from livestage.models.rope import Rotary3D, apply_rotary, grid_positions
from livestage.models.sampler import FlowMatchSchedule


class ClipAttention:
    """Video tokens of a run of chunks see the reference tokens and every video token."""

    def __init__(self, references: RotaryViews, rotary: Rotary3D, positions: torch.Tensor):
        self.references = references
        self.table = rotary.table(positions)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        table = self.table.to(q.device, torch.float32)
        q, k = apply_rotary(q, table), apply_rotary(k, table)
        ref_k = self.references.keys[layer]
        if ref_k is not None:
            k = torch.cat([ref_k.to(k.dtype), k], dim=1)
            v = torch.cat([self.references.values[layer].to(v.dtype), v], dim=1)
        return sdpa(q, k, v)


@dataclass
class ClipConditions:
    """Everything but the latents for one forward over a window (one row per batch item)."""

    context: torch.Tensor  # embedded text [B, text_len, dim]
    references: RotaryViews
    audio: AudioContext | None
    chunks: int


def reference_views(model: WanDiT, references: list[tuple[str, torch.Tensor]], latent_hw: tuple[int, int],
                    batch: int) -> RotaryViews:
    """Reference K/V of `model`, prefilled and rotated exactly as the streaming cache does it."""
    cache = ChunkKVCache(model.cache_geometry(*latent_hw))
    weight = model.text_embedding[0].weight
    empty = torch.zeros(batch, 0, model.config.text_dim, device=weight.device, dtype=weight.dtype)
    model.prefill_references(references, model.embed_text(empty), cache)
    return cache.rotary_views(model.rotary)


def clip_conditions(model: WanDiT, text: torch.Tensor, speak: torch.Tensor | None,
                    listen: torch.Tensor | None, references: RotaryViews, chunks: int,
                    latent_hw: tuple[int, int]) -> ClipConditions:
    assert model.chunk is not None
    frames = model.chunk.latent_frames_per_chunk * chunks
    _, ph, pw = model.config.patch_size
    tokens_per_frame = (latent_hw[0] // ph) * (latent_hw[1] // pw)
    audio = None
    if model.config.audio_dim:
        audio = model.audio_context(speak, listen, frames, tokens_per_frame, batch=text.shape[0], chunks=chunks)
    return ClipConditions(model.embed_text(text), references, audio, chunks)


def clip_flow(model: WanDiT, x: torch.Tensor, sigma_frames: torch.Tensor, cond: ClipConditions,
              num_train_timesteps: int = 1000) -> torch.Tensor:
    """Flow prediction for latents [B, C, F, h, w] with a noise level per latent frame [B, F]."""
    tokens, grid = model.embed_video(x)
    per_frame = grid[1] * grid[2]
    t = (sigma_frames * num_train_timesteps).repeat_interleave(per_frame, dim=1)
    e, e0 = model.time_modulation(t)
    plan = ClipAttention(cond.references, model.rotary, grid_positions(*grid))
    hidden = model.run_blocks(tokens, e0, plan, cond.context, cond.audio)
    return model.unpatchify(model.head(hidden, e), grid)


def sigma_grid(schedule: FlowMatchSchedule, steps: int) -> list[float]:
    """sigma at t_i = T (1 - i/steps), i = 0..steps (the last is 0)."""
    total = schedule.config.num_train_timesteps
    return [schedule.sigma(total * (1 - i / steps)) for i in range(steps + 1)]


@dataclass
class TeacherSample:
    clean: torch.Tensor  # x0 of the generated frames
    states: dict[float, torch.Tensor]  # noisy latents of the trajectory at the requested sigmas
    noise: torch.Tensor


class TeacherSampler:
    """Full-step Euler ODE sampling with CFG, from scratch or as chunk-wise continuation."""

    def __init__(self, model: WanDiT, schedule: FlowMatchSchedule, steps: int = 20, guidance: float = 3.0):
        self.model = model
        self.schedule = schedule
        self.steps = steps
        self.guidance = guidance
        self.sigmas = sigma_grid(schedule, steps)

    def guided_flow(self, x: torch.Tensor, sigma_frames: torch.Tensor, cond: ClipConditions,
                    uncond: ClipConditions | None) -> torch.Tensor:
        v_c = clip_flow(self.model, x, sigma_frames, cond)
        if uncond is None or self.guidance == 1.0:
            return v_c
        v_u = clip_flow(self.model, x, sigma_frames, uncond)
        return v_u + self.guidance * (v_c - v_u)

    @property
    def nfe_per_window(self) -> int:
        return self.steps * (2 if self.guidance != 1.0 else 1)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond: ClipConditions, uncond: ClipConditions | None,
               context: torch.Tensor | None = None, record: tuple[float, ...] = ()) -> TeacherSample:
        """Generates the frames of `noise` [B, C, Fn, h, w]; `context` [B, C, Fc, h, w] are clean
        frames in front of them (continuation). Returns x0 and the trajectory at `record`."""
        x = noise
        states: dict[float, torch.Tensor] = {}
        fc = 0 if context is None else context.shape[2]
        b, fn = noise.shape[0], noise.shape[2]
        for s, s_next in zip(self.sigmas[:-1], self.sigmas[1:]):
            for r in record:
                if abs(s - r) < 1e-6:
                    states[r] = x.clone()
            sig = torch.cat([torch.zeros(b, fc), torch.full((b, fn), s)], dim=1).to(x.device)
            full = x if context is None else torch.cat([context, x], dim=2)
            v = self.guided_flow(full, sig, cond, uncond)[:, :, fc:]
            x = x + (s_next - s) * v
        return TeacherSample(clean=x, states=states, noise=noise)

    def x0(self, x_t: torch.Tensor, sigma: float, cond: ClipConditions, uncond: ClipConditions | None,
           context: torch.Tensor | None = None) -> torch.Tensor:
        """The guided clean prediction at one noise level (the DMD "real score")."""
        fc = 0 if context is None else context.shape[2]
        b, fn = x_t.shape[0], x_t.shape[2]
        sig = torch.cat([torch.zeros(b, fc), torch.full((b, fn), sigma)], dim=1).to(x_t.device)
        full = x_t if context is None else torch.cat([context, x_t], dim=2)
        v = self.guided_flow(full, sig, cond, uncond)[:, :, fc:]
        return x_t - sigma * v
