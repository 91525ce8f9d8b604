"""Few-step flow-matching sampling: the 2-step backbone and the 1-step refiner.

Flow matching: x_t = (1 - s) x0 + s * noise with s = sigma(t); the model predicts the flow
v = noise - x0, so x0 = x_t - s * v. Timesteps are warped by `shift` (Wan / Self-Forcing). Between
steps the clean prediction is re-noised with *fresh* noise (DMD-style), not an Euler step.

- `BackboneSampler`: T0 -> T1 -> clean, attending to the noisy-history cache. The last step's input
  (its own re-noised prediction) is what it writes into that cache, at no extra cost.
- `RefinerSampler`: re-noises the backbone output to T2, one step to clean, attending to the
  clean-history cache; then one write pass on the refined latent at t=0 fills that cache.

Noise is drawn from a generator seeded by (session seed, chunk index, role, step), so a chunk is
reproducible on any worker: failover and the Triton path give the same latents as in-process.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from livestage.models.config import SamplerConfig
from livestage.models.dit import AudioContext, WanDiT
from livestage.models.kv_cache import CachedChunk, ChunkKVCache


class FlowMatchSchedule:
    """Timestep warping and the flow-matching noising/denoising formulas."""

    def __init__(self, config: SamplerConfig):
        self.config = config

    def sigma(self, t: float) -> float:
        s = t / self.config.num_train_timesteps
        k = self.config.shift
        return k * s / (1 + (k - 1) * s)

    def model_timestep(self, t: float) -> float:
        """The (warped) timestep value the DiT's time embedding receives."""
        return self.sigma(t) * self.config.num_train_timesteps

    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        return (1.0 - sigma) * x0 + sigma * noise

    @staticmethod
    def to_clean(x_t: torch.Tensor, flow: torch.Tensor, sigma: float) -> torch.Tensor:
        return x_t - sigma * flow


def chunk_noise(seed: int, chunk_index: int, role: str, step: int, shape: tuple[int, ...],
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Deterministic Gaussian noise for (seed, chunk, role, step), independent of the worker."""
    digest = hashlib.blake2b(f"{seed}:{chunk_index}:{role}:{step}".encode(), digest_size=8).digest()
    gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


@dataclass
class ChunkConditions:
    """Everything the DiT needs for one chunk besides the latents."""

    context: torch.Tensor  # embedded text [B, text_len, dim]
    audio: AudioContext | None = None


class BackboneSampler:
    """The causal 2-step backbone with its noisy-history cache."""

    role = "backbone"

    def __init__(self, model: WanDiT, config: SamplerConfig):
        self.model = model
        self.schedule = FlowMatchSchedule(config)
        self.timesteps = tuple(config.backbone_timesteps)

    @torch.no_grad()
    def generate(self, cache: ChunkKVCache, cond: ChunkConditions, shape: tuple[int, ...],
                 seed: int, chunk_index: int, commit: bool = True) -> torch.Tensor:
        """Returns the coarse clean latent of the chunk; commits its history K/V to the cache."""
        weight = self.model.patch_embedding.weight
        device, dtype = weight.device, weight.dtype
        x = chunk_noise(seed, chunk_index, self.role, 0, shape, device, dtype)
        sigma0 = self.schedule.sigma(self.timesteps[0])
        if sigma0 < 1.0:
            x = self.schedule.add_noise(torch.zeros_like(x), x, sigma0)
        clean = x
        cached: CachedChunk | None = None
        for step, t in enumerate(self.timesteps):
            sigma = self.schedule.sigma(t)
            last = step == len(self.timesteps) - 1
            t_in = torch.full((shape[0],), self.schedule.model_timestep(t), device=device)
            out = self.model.forward_chunk(x, t_in, cond.context, cache, cond.audio,
                                           capture=last, chunk_index=chunk_index)
            clean = self.schedule.to_clean(x, out.flow, sigma)
            cached = out.cached
            if not last:
                noise = chunk_noise(seed, chunk_index, self.role, step + 1, shape, device, dtype)
                x = self.schedule.add_noise(clean, noise, self.schedule.sigma(self.timesteps[step + 1]))
        if commit and cached is not None:
            cache.append(cached)
        return clean

    @property
    def nfe(self) -> int:
        return len(self.timesteps)


class RefinerSampler:
    """The 1-step refiner at T2 with its clean-history cache."""

    role = "refiner"

    def __init__(self, model: WanDiT, config: SamplerConfig):
        self.model = model
        self.schedule = FlowMatchSchedule(config)
        self.timestep = config.refiner_timestep
        self.history_timestep = config.refiner_history_timestep

    @torch.no_grad()
    def refine(self, cache: ChunkKVCache, cond: ChunkConditions, coarse: torch.Tensor,
               seed: int, chunk_index: int, commit: bool = True) -> torch.Tensor:
        shape = tuple(coarse.shape)
        device, dtype = coarse.device, coarse.dtype
        sigma = self.schedule.sigma(self.timestep)
        noise = chunk_noise(seed, chunk_index, self.role, 0, shape, device, dtype)
        x = self.schedule.add_noise(coarse, noise, sigma)
        t_in = torch.full((shape[0],), self.schedule.model_timestep(self.timestep), device=device)
        out = self.model.forward_chunk(x, t_in, cond.context, cache, cond.audio)
        clean = self.schedule.to_clean(x, out.flow, sigma)
        if commit:
            self.write_history(cache, cond, clean, chunk_index)
        return clean

    def write_history(self, cache: ChunkKVCache, cond: ChunkConditions, clean: torch.Tensor,
                      chunk_index: int) -> None:
        """One pass over the refined latent at the history timestep, capturing its K/V."""
        h_sigma = self.schedule.sigma(self.history_timestep)
        x = clean if h_sigma == 0 else self.schedule.add_noise(
            clean, chunk_noise(0, chunk_index, "refiner-history", 0, tuple(clean.shape),
                               clean.device, clean.dtype), h_sigma)
        t_in = torch.full((clean.shape[0],), self.schedule.model_timestep(self.history_timestep),
                          device=clean.device)
        out = self.model.forward_chunk(x, t_in, cond.context, cache, cond.audio, capture=True,
                                       chunk_index=chunk_index)
        assert out.cached is not None
        cache.append(out.cached)

    @property
    def nfe(self) -> int:
        return 2
